"""The multirun half of ``+auto_parallel=uniap``: a sweeper that wraps the configured one
and plans each job's config before its task runs. The auto_parallel callback installs it;
it is not meant to be chosen by hand. Imported in every Hydra app: keep it thin."""

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper


class UniapPlanningSweeper(Sweeper):
    def __init__(self, **wrapped_sweeper_config: Any) -> None:
        self.sweeper: Optional[Sweeper] = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from uniap_megatron.integrations.hydra_callback import setup_wrapped_sweeper

        self.sweeper = setup_wrapped_sweeper(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        assert self.sweeper is not None, "setup() first"
        return self.sweeper.sweep(arguments)
