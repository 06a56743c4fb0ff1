"""KVAwareRequestRouter's ranking: pinned calls, prefix affinity, exclusions, least loaded (in flight
first, reported stats where unknown), random ties."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.serve.request_router import RequestRouter

from k2ray.sampling_params import SamplingParams
from k2ray.serve.pd.kv_request_router import KVAwareRequestRouter
from k2ray.serve.pd.pd_protocol import KVSendOrder, PrefillJob, ReplicaPin
from k2ray.serve.pd.prefix_hashes import num_leading_matches, prompt_block_hashes

BLOCK_SIZE = 4


@dataclass
class _Id:
    unique_id: str


@dataclass
class _Replica:  # what the router reads of a RunningReplica
    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> _Id:
        return _Id(self.name)


@dataclass
class _Pending:
    args: list


class _Router(KVAwareRequestRouter):
    """The ranking alone: Serve's machinery (and its queue-length cache) replaced by a dict."""

    def __init__(self, num_in_flight: dict[str, int] | None = None) -> None:
        self._num_in_flight = num_in_flight or {}

    def num_in_flight(self, replica) -> int | None:
        return self._num_in_flight.get(replica.name)


async def rank(candidates, first_arg, num_in_flight: dict[str, int] | None = None) -> list[str]:
    groups = await _Router(num_in_flight).choose_replicas(candidates, _Pending([first_arg]))
    return [replica.name for group in groups for replica in group]


def job(token_ids, excluded=()) -> PrefillJob:
    return PrefillJob("r", token_ids, SamplingParams(), prompt_block_hashes(token_ids, BLOCK_SIZE), excluded)


def loaded(name, num_running, num_free_blocks=100, cached=()) -> _Replica:
    return _Replica(name, {"num_running": num_running, "num_waiting": 0, "num_free_blocks": num_free_blocks,
                           "cached_hashes": list(cached)})


async def test_prefix_affinity_beats_load_and_exclusions_are_skipped():
    tokens = list(range(16))  # 4 full blocks
    hashes = prompt_block_hashes(tokens, BLOCK_SIZE)
    replicas = [loaded("a", 0), loaded("b", 5, cached=hashes[:3]), loaded("c", 1, cached=hashes[:1])]
    assert await rank(replicas, job(tokens)) == ["b", "c", "a"]
    assert await rank(replicas, job(tokens, excluded=("b",))) == ["c", "a"]
    assert await rank(replicas, job(tokens, excluded=("a", "b", "c"))) == ["b", "c", "a"]  # none left: all


async def test_without_affinity_the_least_loaded_comes_first():
    replicas = [loaded("a", 3), loaded("b", 1, num_free_blocks=10), loaded("c", 1, num_free_blocks=50)]
    assert await rank(replicas, job(list(range(6)))) == ["c", "b", "a"]
    assert await rank(replicas, object()) == ["c", "b", "a"]  # a decode request: load only
    assert await rank([_Replica("fresh"), loaded("a", 1)], object()) == ["fresh", "a"]  # no stats yet: idle


async def test_requests_in_flight_outrank_stale_stats():
    replicas = [loaded("a", 0), loaded("b", 2)]  # reported a stats period ago
    assert await rank(replicas, object(), {"a": 3, "b": 1}) == ["b", "a"]  # sent since: a is busier
    assert await rank(replicas, object(), {"a": 3}) == ["b", "a"]  # b unknown: its reported 2 stand


async def test_ties_go_to_a_random_replica():
    replicas = [loaded("a", 1), loaded("b", 1), loaded("c", 4)]
    firsts = {(await rank(replicas, object()))[0] for _ in range(200)}
    assert firsts == {"a", "b"}


async def test_pinned_calls_go_to_their_replica_only():
    replicas = [loaded("a", 0), loaded("b", 9)]
    assert await rank(replicas, ReplicaPin("b")) == ["b"]
    order = KVSendOrder("b", None, None)  # type: ignore[arg-type]
    assert await rank(replicas, order) == ["b"]
    assert await rank(replicas, ReplicaPin("gone")) == ["a", "b"]  # gone: another answers, nothing waits


def test_each_request_gets_the_replica_chosen_for_it():
    # FIFO fulfilment would hand a replica found for one pinned call to an older pending call.
    assert KVAwareRequestRouter._fulfill_next_pending_request is RequestRouter._fulfill_next_pending_request


def test_block_hashes_chain_like_the_engine():
    tokens = list(range(10))
    hashes = prompt_block_hashes(tokens, BLOCK_SIZE)
    assert len(hashes) == 2  # the partial last block is not hashed
    assert prompt_block_hashes([99, *tokens[1:]], BLOCK_SIZE)[1] != hashes[1]  # a block's hash covers its prefix
    assert num_leading_matches(hashes, frozenset(hashes[1:])) == 0  # a chain: no first block, no match
    assert num_leading_matches(hashes, frozenset(hashes)) == 2
