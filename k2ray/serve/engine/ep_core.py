"""The engine core of one rank of an expert-parallel replica: `python -m k2ray.serve.engine.ep_core FD`.

Everything an engine core does (engine_core.py: the replica's messages, deltas over the delta channel, P/D
agents), with the step loop in lockstep with the replica's other ranks (k2ray.dist.ep_engine): before each
step the ranks agree whether any has work, a rank with none still steps (an empty forward through the MoE
dispatch), and an idle group waits at most IDLE_WAIT_S per round (the replica wakes every rank when it
sends one a request, so a new request does not wait out the others' idle wait). Shutting down is agreed
too, so no rank is left in a collective. A lost rank ends every request of this rank with a clear error
(its blocks freed), tells the replica (CoreFailed: its health check fails and Serve replaces it) and exits.
"""

from __future__ import annotations

import logging
import sys

from k2ray.dist.ep_engine import EPEngine
from k2ray.dist.ep_group import EPGroupSpec, EPPeerUnavailable
from k2ray.engine.llm_engine import LLMEngine
from k2ray.engine.outputs import RequestOutput
from k2ray.serve.engine.engine_core import EngineCore, main
from k2ray.serve.engine.engine_core_protocol import CoreConfig, CoreFailed
from k2ray.serve.engine.engine_protocol import EngineDelta, EngineFailure

logger = logging.getLogger(__name__)

GROUP_LOST = "an expert-parallel rank of this engine replica failed; the replica restarts, retry the request"


class EPEngineCore(EngineCore):
    FATAL_ERRORS = (EPPeerUnavailable,)

    def _make_engine(self, config: CoreConfig) -> LLMEngine:
        if config.ep is None:
            raise ValueError("an EP engine core needs its rank (CoreConfig.ep)")
        ep = config.ep
        self.ep_engine = EPEngine(config.engine, EPGroupSpec(ep.host, ep.port, ep.group_id, ep.rank,
                                                             config.engine.ep_size))
        return self.ep_engine.engine

    def _run_step(self) -> list[RequestOutput]:
        return self.ep_engine.step()

    def run(self) -> None:
        self.conn.send(self.ready())
        is_busy = is_stopping = False
        try:
            while True:
                wait_s = 0 if is_busy else self._wait_s()
                is_stopping = not self._take_messages(self.inbox, wait_s) or is_stopping
                agreement = self.ep_engine.agree(self.engine.has_unfinished_requests(), is_stopping)
                if agreement.is_stopping:
                    break
                is_busy = agreement.is_busy
                if is_busy:
                    self._step()
                if self.injector is not None:
                    self._replay_scripts()
                self._tend_agents()
                self._flush()
        except EPPeerUnavailable as exc:
            self._fail_group(exc)
        finally:
            for agent in (self.prefill_agent, self.decode_agent):
                if agent is not None:
                    agent.close()
            self.links.close()
            self.ep_engine.shutdown()

    def _fail_group(self, exc: EPPeerUnavailable) -> None:
        logger.error("EP rank %d lost its group: %s", self.ep_engine.rank, exc)
        self.ep_engine.fail_all()
        for request_id in list(self.routes):
            if self.decode_agent is not None:
                self.decode_agent.abort(request_id)
            self.assembler.forget(request_id)
            self._deliver(request_id, EngineDelta(failure=EngineFailure("unavailable", GROUP_LOST)))
        self._flush()
        manager = self.engine.kv_cache_manager
        self.conn.send(CoreFailed(f"EP rank {self.ep_engine.rank} lost its group ({manager.num_free_blocks} of "
                                  f"{manager.num_total_blocks} blocks free): {exc}"))


if __name__ == "__main__":
    main(sys.argv[1:], EPEngineCore)
