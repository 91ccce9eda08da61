"""How much a deployment serves, from measured per-request costs; and the cheapest deployment that
serves a target (RAGO's question, answered with profiles instead of a simulator).

Each process is a server of known cost per request: a retrieval node serves a sub-request on one
core (single queries are scanned on the node's own thread), the coordinator one search at a time,
an inference replica its batch. A tier's capacity is what its busiest process allows (for the
retrieval tier, the share of it its processes reached when measured: ``busy_ceiling``); the
deployment's is its slowest tier's, and where processes share a host, also the host's cores over
the CPU a request costs in all. TTFT at a load is the unloaded path plus an M/M/c (Erlang C) estimate of
the 99th-percentile queueing at each tier's utilisation: an estimate, not a measurement.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, replace

from chameleon.plan.profiles import InferenceProfile, RetrievalProfile
from retriever.errors import InvalidInput

ID_BYTES = 8  # each code's id, stored beside it
NODE_MEMORY_HEADROOM = 1.25  # the process, its buffers and the scan's scratch beyond the codes


@dataclass(frozen=True)
class Workload:
    """What the requests ask: ``retrieval_interval`` > 0 retrieves again every that many generated
    tokens (iterative RAG); each retrieval's passages join the prompt."""

    ntotal: int
    nlist: int
    code_size: int
    nprobe: int
    passages: int = 4
    passage_tokens: int = 120
    question_tokens: int = 60  # the question and the prompt's template
    output_tokens: int = 64
    retrieval_interval: int = 0

    def __post_init__(self):
        for name in ("ntotal", "nlist", "code_size", "nprobe", "passages", "passage_tokens", "question_tokens", "output_tokens"):
            if getattr(self, name) < (0 if name in ("passages", "question_tokens") else 1):
                raise InvalidInput(f"{name} must be positive, got {getattr(self, name)}")
        if self.nprobe > self.nlist:
            raise InvalidInput(f"nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist})")
        if self.retrieval_interval < 0:
            raise InvalidInput(f"retrieval_interval must be >= 0, got {self.retrieval_interval}")

    @property
    def retrievals(self) -> int:
        """Searches per request."""
        if not self.retrieval_interval:
            return 1
        return 1 + (self.output_tokens - 1) // self.retrieval_interval

    @property
    def prompt_tokens(self) -> int:
        """Tokens prefilled per request: the question and every retrieval's passages."""
        return self.question_tokens + self.retrievals * self.passages * self.passage_tokens


@dataclass(frozen=True)
class Deployment:
    """Processes per tier. ``host_cores``: the cores of the one host they all share (None: each
    process has its own cores, as pods with requests do)."""

    shards: int
    replicas: int  # nodes per shard
    inference_replicas: int
    max_batch: int = 8
    host_cores: float | None = None
    coordinators: int = 1  # behind one Service: each server keeps its connection to one of them

    def __post_init__(self):
        if min(self.shards, self.replicas, self.inference_replicas, self.max_batch, self.coordinators) < 1:
            raise InvalidInput(f"every count of a deployment must be at least 1: {self}")
        if self.host_cores is not None and not self.host_cores > 0:
            raise InvalidInput(f"host_cores must be positive, got {self.host_cores}")


@dataclass
class Prediction:
    requests_per_s: float  # what the deployment serves at most
    bottleneck: str
    capacity: dict[str, float]  # requests/s each limit allows
    retrieval_latency_s: float  # one search, unloaded
    ttft_s: float  # one request, unloaded
    node_memory_gib: float

    def utilisation(self, requests_per_s: float) -> dict[str, float]:
        return {name: requests_per_s / cap for name, cap in self.capacity.items()}

    def ttft_p99_s(self, requests_per_s: float, deployment: Deployment) -> float:
        """TTFT's 99th percentile at ``requests_per_s``: the unloaded path plus each tier's M/M/c
        queueing wait (inference: every replica's batch slots; retrieval: a shard's replicas);
        inf at or past capacity."""
        wait = 0.0
        servers = {"inference": deployment.inference_replicas * deployment.max_batch, "retrieval nodes": deployment.replicas}
        for name, count in servers.items():
            if requests_per_s >= self.capacity[name]:
                return math.inf
            wait += wait_p99_s(requests_per_s, self.capacity[name] / count, count)
        return self.ttft_s + wait

    def as_dict(self) -> dict:
        return asdict(self)


def wait_p99_s(arrivals_per_s: float, service_per_s: float, servers: int) -> float:
    """The 99th percentile of the wait in an M/M/c queue (Erlang C): P(wait > t) = C e^{-(c mu - lambda) t}."""
    offered = arrivals_per_s / service_per_s
    blocking = 1.0  # Erlang B, by its recursion over the servers
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    waits = blocking / (1 - offered / servers * (1 - blocking))  # Erlang C: the chance a request waits at all
    if waits <= 0.01:
        return 0.0
    return math.log(waits / 0.01) / (servers * service_per_s - arrivals_per_s)


def codes_scanned(workload: Workload, retrieval: RetrievalProfile) -> float:
    return workload.nprobe * workload.ntotal / workload.nlist * retrieval.list_skew


def node_seconds(workload: Workload, retrieval: RetrievalProfile, shards: int) -> float:
    """CPU seconds of one node's share of a search (its shard's codes)."""
    per_code = retrieval.node_per_code_s * workload.code_size / retrieval.code_size
    return retrieval.node_s + per_code * codes_scanned(workload, retrieval) / shards


def node_memory_gib(workload: Workload, shards: int) -> float:
    return workload.ntotal / shards * (workload.code_size + ID_BYTES) * NODE_MEMORY_HEADROOM / 2**30


def inference_seconds(workload: Workload, inference: InferenceProfile, max_batch: int) -> float:
    """Wall seconds of an inference replica's time one request takes at a full batch: its
    question's embedding, its prefill and its share of the decode steps."""
    decode = workload.output_tokens * inference.step_seconds(max_batch) / max_batch
    return workload.retrievals * inference.embed_s + inference.prefill_seconds(workload.prompt_tokens) + decode


def predict(workload: Workload, deployment: Deployment, retrieval: RetrievalProfile, inference: InferenceProfile | None) -> Prediction:
    """The requests/s ``deployment`` serves for ``workload`` (searches/s when ``inference`` is None:
    the retrieval tier alone, driven by one caller)."""
    searches = workload.retrievals
    shards = deployment.shards
    node = node_seconds(workload, retrieval, shards)
    coordinator = retrieval.coordinator_s + retrieval.coordinator_per_shard_s * shards
    fronts = deployment.inference_replicas if inference is not None else 1
    ceiling = retrieval.busy_ceiling
    capacity = {
        "retrieval nodes": ceiling * deployment.replicas / (node * searches),
        "coordinator": ceiling * deployment.coordinators / (coordinator * searches),
        "front": ceiling * fronts / (retrieval.front_s * searches),
    }
    # cores' worth a request takes: the retrieval tier's CPU time over the share of a core its
    # processes keep busy; the inference replica's wall time on all its threads
    cpu = {"retrieval": searches * (retrieval.front_s + coordinator + shards * node) / ceiling}
    retrieval_latency = retrieval.front_s + coordinator + node
    ttft = retrieval_latency
    if inference is None:
        capacity["inference"] = math.inf
    else:
        per_request = inference_seconds(workload, inference, deployment.max_batch)
        capacity["inference"] = deployment.inference_replicas / per_request
        cpu["inference"] = per_request * inference.threads
        # a request admitted between two decode steps waits for the running one
        ttft += inference.embed_s + inference.prefill_seconds(workload.prompt_tokens) + inference.step_seconds(deployment.max_batch)
    if deployment.host_cores is not None:
        capacity["host cores"] = deployment.host_cores / sum(cpu.values())
    bottleneck = min(capacity, key=capacity.get)
    if bottleneck == "host cores":
        heaviest = max(cpu, key=cpu.get)
        bottleneck += f" ({heaviest} uses {cpu[heaviest] / sum(cpu.values()):.0%} of the CPU)"
    return Prediction(
        requests_per_s=min(capacity.values()),
        bottleneck=bottleneck,
        capacity=capacity,
        retrieval_latency_s=retrieval_latency,
        ttft_s=ttft,
        node_memory_gib=node_memory_gib(workload, shards),
    )


@dataclass(frozen=True)
class Target:
    requests_per_s: float
    ttft_p99_s: float | None = None
    utilisation: float = 0.75  # the most of any capacity a plan uses: headroom for bursts
    node_memory_gib: float = 64.0
    max_shards: int = 256
    max_replicas: int = 64
    max_inference_replicas: int = 256
    max_coordinators: int = 16
    inference_replica_cost: float = 8.0  # what an inference replica costs, in cores
    max_batch: int = 8
    min_replicas: int = 1  # per shard: 2 lets a node fail or drain without losing its shard
    gib_cost: float = 0.125  # a GiB of node memory, in cores (clouds price ~8 GiB like a core)

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidInput(f"min_replicas must be between 1 and max_replicas ({self.max_replicas}), got {self.min_replicas}")
        if not self.gib_cost >= 0 or not self.inference_replica_cost >= 0:
            raise InvalidInput("costs must be >= 0")
        if not self.requests_per_s > 0:
            raise InvalidInput(f"the target must be a positive rate, got {self.requests_per_s}")
        if not 0 < self.utilisation <= 1:
            raise InvalidInput(f"utilisation must be in (0, 1], got {self.utilisation}")
        if self.ttft_p99_s is not None and not self.ttft_p99_s > 0:
            raise InvalidInput(f"the TTFT SLO must be positive, got {self.ttft_p99_s}")


@dataclass
class Plan:
    deployment: Deployment | None
    prediction: Prediction | None
    ttft_p99_s: float
    cost: float  # retrieval nodes (a core and their memory each), coordinators (a core) and inference replicas, in cores
    reason: str  # what limits the plan, or why there is none


def cheapest_plan(workload: Workload, target: Target, retrieval: RetrievalProfile, inference: InferenceProfile | None) -> Plan:
    """The cheapest deployment that serves ``target`` within its utilisation, node memory and TTFT
    SLO; with none, a Plan without one saying what stood in the way. Without ``inference``, the
    retrieval tier alone (``target`` in searches/s, TTFT: the search's latency)."""
    best: Plan | None = None
    refusals: list[str] = []
    rate = target.requests_per_s / target.utilisation  # the capacity the plan needs
    for shards in range(1, target.max_shards + 1):
        if node_memory_gib(workload, shards) > target.node_memory_gib:
            refusals.append("node memory")
            continue
        one = predict(workload, Deployment(shards, 1, 1, target.max_batch), retrieval, inference)
        coordinators = math.ceil(rate / one.capacity["coordinator"])
        replicas = max(target.min_replicas, math.ceil(rate / one.capacity["retrieval nodes"]))
        if coordinators > target.max_coordinators:
            refusals.append("coordinators")
            continue
        if replicas > target.max_replicas:
            refusals.append("retrieval replicas")
            continue
        if inference is None:  # the retrieval tier alone, its callers elsewhere
            deployment = Deployment(shards, replicas, 1, target.max_batch, coordinators=coordinators)
            prediction = predict(workload, deployment, retrieval, None)
            fitted = deployment, prediction, prediction.ttft_p99_s(target.requests_per_s, deployment)
        else:  # one server replica per ``front`` too: each does its requests' coarse search
            inference_replicas = math.ceil(rate / min(one.capacity["inference"], one.capacity["front"]))
            fitted = _fewest_inference_replicas(
                workload,
                target,
                Deployment(shards, replicas, inference_replicas, target.max_batch, coordinators=coordinators),
                retrieval,
                inference,
            )
        if isinstance(fitted, str):
            refusals.append(fitted)
            continue
        deployment, prediction, p99 = fitted
        node_cost = 1 + target.gib_cost * node_memory_gib(workload, shards)
        cost = shards * replicas * node_cost + coordinators
        if inference is not None:
            cost += deployment.inference_replicas * target.inference_replica_cost
        if best is None or cost < best.cost:
            utilisation = prediction.utilisation(target.requests_per_s)
            busiest = max(utilisation, key=utilisation.get)
            best = Plan(deployment, prediction, p99, cost, f"{busiest} ({utilisation[busiest]:.0%} busy at the target)")
    if best is not None:
        return best
    reason = Counter(refusals).most_common(1)[0][0] if refusals else "nothing to try"
    return Plan(None, None, math.inf, math.inf, f"no deployment within the limits meets the target: {reason} stood in the way")


def _fewest_inference_replicas(
    workload: Workload, target: Target, deployment: Deployment, retrieval: RetrievalProfile, inference: InferenceProfile
) -> tuple[Deployment, Prediction, float] | str:
    """``deployment`` with the fewest inference replicas, from its count up, whose TTFT p99 meets
    the SLO at the target rate; or what stood in the way."""
    for count in range(deployment.inference_replicas, target.max_inference_replicas + 1):
        trial = replace(deployment, inference_replicas=count)
        prediction = predict(workload, trial, retrieval, inference)
        p99 = prediction.ttft_p99_s(target.requests_per_s, trial)
        if target.ttft_p99_s is None or p99 <= target.ttft_p99_s:
            return trial, prediction, p99
        if prediction.ttft_s > target.ttft_p99_s:
            return "TTFT (even unloaded)"
    return "inference replicas"
