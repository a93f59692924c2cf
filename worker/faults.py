"""Development-only fault injection for the chaos tests: jobs with these exact prompts break the
worker on purpose (T2I_DEBUG_FAIL_PROMPT, and T2I_DEBUG_FAULTS for the rest)."""

import threading
from dataclasses import dataclass

from worker.executor import RenderFunction
from worker.render_types import PreviewCallback, RenderBatch, StepCallback

# The render never returns: the executor is hung and the worker must exit.
HANG_RENDER = "debug:hang-render"
# Every progress write of the job raises.
FAIL_PROGRESS_WRITE = "debug:fail-progress-write"
# Admitting the job to a batch raises, on the executor thread.
FAIL_ADMISSION = "debug:fail-admission"


class InjectedFault(RuntimeError):
    """Raised on purpose by a debug prompt."""


@dataclass(frozen=True)
class Faults:
    fail_prompt: str | None = None
    enabled: bool = False

    def check(self, prompt: str, fault: str) -> None:
        """Raise when `prompt` asks for `fault` and faults are on."""
        if self.enabled and prompt == fault:
            raise InjectedFault(f"injected fault {fault!r}")

    def on_admission(self, prompt: str) -> None:
        self.check(prompt, FAIL_ADMISSION)

    def on_progress_write(self, prompt: str) -> None:
        self.check(prompt, FAIL_PROGRESS_WRITE)

    def wrap(self, render: RenderFunction) -> RenderFunction:
        """The render, failing or hanging for the prompts that ask for it."""
        if self.fail_prompt is None and not self.enabled:
            return render

        def faulty_render(
            batch: RenderBatch,
            on_step: StepCallback | None,
            on_preview: PreviewCallback | None = None,
        ) -> list:
            prompts = {item.prompt for item in batch.items}
            if self.fail_prompt in prompts:
                raise RuntimeError(f"injected failure for prompt {self.fail_prompt!r}")
            if self.enabled and HANG_RENDER in prompts:
                threading.Event().wait()
            return render(batch, on_step, on_preview)

        return faulty_render
