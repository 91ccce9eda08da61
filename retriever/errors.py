"""The errors of the whole project: one base, and the kinds that callers handle differently.

Every message is meant for the user as it stands: front ends print it without a traceback. Each
kind is mapped once to an HTTP status (``chameleon.server.errors``) and once to a command-line
exit code (``chameleon.cli``):

============== ======================================================== ====== =========
kind           what                                                     HTTP   exit code
============== ======================================================== ====== =========
InvalidInput   bad shapes, values or parameters; a corrupt or truncated  400    2
               file
NotFound       a file, index, dataset or cluster that is not there       404    2
Unsupported    asks for what this host or install cannot do (vLLM, CUDA,  400    2
               an instruction set, a package)
Unavailable    a tier or peer that does not answer now (no live replica,  503    3
               shutting down, overloaded, unreachable)
Timeout        no answer in time (an Unavailable)                         504    3
============== ======================================================== ====== =========
"""


class ChameleonError(Exception):
    """The base of every error the project raises on purpose."""


class InvalidInput(ChameleonError, ValueError):
    """Bad input (shapes, values, parameters), or a corrupt or truncated index or dataset file."""


class NotFound(ChameleonError):
    """Something named does not exist: a file, an index, a dataset, a cluster's state."""


class Unsupported(ChameleonError):
    """A request this host or installation cannot serve: a missing optional package, no CUDA, a
    CPU without the asked instruction set."""


class Unavailable(ChameleonError):
    """A tier or peer does not answer now; the same request may succeed later or elsewhere."""


class Timeout(Unavailable):
    """No answer within the time allowed."""
