"""Makes ``+auto_parallel=uniap`` available in every Hydra app once uniap-megatron is
installed. Hydra imports this module in every app at start-up: it must stay this thin."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class UniapSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Only the auto_parallel group: the planner's own model/ and cluster/ groups stay out
        # of the apps' config groups.
        search_path.append(provider="uniap-megatron", path="pkg://uniap_megatron.hydra_configs.plugin")
