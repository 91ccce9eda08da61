"""The errors of the whole project: one base, and the kinds that callers handle differently.

Every message is meant for the user as it stands: front ends print it without a traceback. Each
kind is mapped once to an HTTP status (``chameleon.server.errors``) and once to a command-line
exit code (``chameleon.cli``):

- ``InvalidInput`` (400, exit 2): bad shapes, values or parameters; a corrupt or truncated file; a
  directory that is not the index, RAG index or datastore it should be.
- ``NotFound`` (404, exit 2): a path, dataset or cluster state that is not there.
- ``Unsupported`` (400, exit 2): what this host or installation cannot do (vLLM, CUDA, an
  instruction set, an optional package).
- ``Unavailable`` (503, exit 3): a tier or peer that does not answer now (no live replica,
  shutting down, overloaded, unreachable, a closed engine).
- ``Timeout`` (504, exit 3): no answer in time; an ``Unavailable``.
"""


class ChameleonError(Exception):
    """The base of every error the project raises on purpose."""


class InvalidInput(ChameleonError, ValueError):
    """Bad input (shapes, values, parameters), a corrupt or truncated file, or a directory that is
    not what it should be."""


class NotFound(ChameleonError):
    """Something named does not exist: a path, a dataset, a cluster's state."""


class Unsupported(ChameleonError):
    """A request this host or installation cannot serve: a missing optional package, no CUDA, a
    CPU without the asked instruction set."""


class Unavailable(ChameleonError):
    """A tier or peer does not answer now; the same request may succeed later or elsewhere."""


class Timeout(Unavailable):
    """No answer within the time allowed."""
