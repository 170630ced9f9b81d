"""`kiln serve` whose engine meets a device error when a request carries DEVICE_FAULT_SEED: how the
server behaves when its engine dies (tests/server/test_server_engine_death.py). Run as
`python -m tests.server.fault_injected_serve serve ...`."""

from __future__ import annotations

import sys

from engines.torch.llm_engine import LLMEngine
from server.cli import main

DEVICE_FAULT_SEED = 4_242_424_242


def _step_with_fault(original):
    def step(self):
        if any(seq.params.seed == DEVICE_FAULT_SEED for seq in [*self.scheduler.running, *self.scheduler.waiting]):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by kiln's tests)")
        return original(self)

    return step


if __name__ == "__main__":
    LLMEngine.step = _step_with_fault(LLMEngine.step)
    sys.exit(main(sys.argv[1:]))
