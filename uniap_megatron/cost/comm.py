"""Collective times on ring algorithms, and where Megatron's process groups land.

Megatron orders ranks ``tp-cp-ep-dp-pp`` (tensor parallel innermost): a group of ``size``
ranks spaced ``stride`` apart stays inside a node when ``stride * size <= gpus_per_node``.
Bandwidths are per GPU, one way; each collective pays ``latency * steps + volume / bw``.
A link may carry measured fits (from a profile): a collective with a fit for its group size
takes the fitted time instead of the ring formula.

A group that spans nodes with ``k`` of its ranks in every node runs ``k`` NCCL rings side by
side, one per network rail, each crossing the node boundary on its own GPU's NIC: the
group's bandwidth is ``k`` times a GPU's network bandwidth, capped by the node's NVLink.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.spec.cluster import ClusterSpec


@dataclass(frozen=True)
class CollectiveFit:
    """A measured collective on ``size`` ranks: ``latency_s + seconds_per_byte * nbytes``,
    with ``nbytes`` in the convention of the function of the same name below."""

    op: str
    size: int
    latency_s: float
    seconds_per_byte: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + self.seconds_per_byte * nbytes


@dataclass(frozen=True)
class Link:
    bandwidth: float
    """Achieved bytes per second, one way, per GPU."""
    latency: float
    """Seconds per algorithm step."""
    intra_node: bool
    fits: tuple[CollectiveFit, ...] = ()
    """Measured collectives on this kind of link; the ring formulas cover the rest."""

    def fit(self, op: str, size: int) -> CollectiveFit | None:
        if not self.fits:  # the analytical links, on every collective the search prices
            return None
        return next((f for f in self.fits if f.op == op and f.size == size), None)


def node_link(cluster: ClusterSpec, *, intra_node: bool) -> Link:
    eff = cluster.comm_efficiency
    if intra_node:
        return Link(cluster.intra_node_bandwidth_gbps * 1e9 * eff, cluster.intra_node_latency_us * 1e-6, True)
    return Link(cluster.inter_node_bandwidth_gbps * 1e9 * eff, cluster.inter_node_latency_us * 1e-6, False)


def group_link(cluster: ClusterSpec, *, stride: int, size: int) -> Link:
    if stride * size <= cluster.gpus_per_node:
        return node_link(cluster, intra_node=True)
    network = node_link(cluster, intra_node=False)
    per_node = max(1, cluster.gpus_per_node // stride)
    rails = min(per_node, size)
    bandwidth = min(rails * network.bandwidth, cluster.intra_node_bandwidth_gbps * 1e9 * cluster.comm_efficiency)
    return Link(bandwidth, network.latency, False)


def all_gather(nbytes: float, size: int, link: Link) -> float:
    """Time to all-gather a tensor of ``nbytes`` (the gathered size) over ``size`` ranks."""
    if size <= 1:
        return 0.0
    if fit := link.fit("all_gather", size):
        return fit.time(nbytes)
    return (size - 1) * link.latency + (size - 1) / size * nbytes / link.bandwidth


def reduce_scatter(nbytes: float, size: int, link: Link) -> float:
    """Time to reduce-scatter a tensor of ``nbytes`` (the unscattered size)."""
    if size <= 1:
        return 0.0
    if fit := link.fit("reduce_scatter", size):
        return fit.time(nbytes)
    return (size - 1) * link.latency + (size - 1) / size * nbytes / link.bandwidth


def all_reduce(nbytes: float, size: int, link: Link) -> float:
    if size <= 1:
        return 0.0
    if fit := link.fit("all_reduce", size):
        return fit.time(nbytes)
    return 2 * (size - 1) * link.latency + 2 * (size - 1) / size * nbytes / link.bandwidth


def all_to_all(nbytes: float, size: int, link: Link) -> float:
    """Each rank sends ``nbytes`` in all, a ``1/size`` share to every peer."""
    if size <= 1:
        return 0.0
    if fit := link.fit("all_to_all", size):
        return fit.time(nbytes)
    return (size - 1) * link.latency + (size - 1) / size * nbytes / link.bandwidth


def send_recv(nbytes: float, link: Link) -> float:
    if fit := link.fit("send_recv", 2):
        return fit.time(nbytes)
    return link.latency + nbytes / link.bandwidth


@dataclass(frozen=True)
class GroupLinks:
    """The link each of a strategy's process groups uses."""

    tp: Link
    cp: Link
    ep: Link
    dp: Link
    edp: Link
    pp: Link
    embedding: Link


def strategy_links(cluster: ClusterSpec, *, tp: int, cp: int, ep: int, dp: int, pp: int) -> GroupLinks:
    # Neighbouring pipeline stages are tp*cp*dp ranks apart: the whole pipeline fits in a
    # node, or some hop crosses nodes, on one GPU's NIC, and that hop sets the pace.
    pp_link = node_link(cluster, intra_node=tp * cp * dp * pp <= cluster.gpus_per_node)
    edp = cp * dp // ep
    return GroupLinks(
        tp=group_link(cluster, stride=1, size=tp),
        cp=group_link(cluster, stride=tp, size=cp),
        ep=group_link(cluster, stride=tp, size=ep),
        dp=group_link(cluster, stride=tp, size=cp * dp),
        edp=group_link(cluster, stride=tp * ep, size=edp),
        pp=pp_link,
        embedding=pp_link,
    )
