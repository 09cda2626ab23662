"""``egomotion draw NET -o net.png|svg|dot``: a picture of a net (Caffe's ``python/draw_net.py``), drawn with
matplotlib so no system package is needed; ``.dot`` writes Graphviz text for those who have it.

Layers are boxes (name, type and the shape-defining parameters), blobs are ellipses; an in-place layer's top
is drawn as the same blob. Nodes are placed by rank (the longest path from a data layer), the ranks along
``rankdir`` (LR, RL, TB or BT, as Graphviz's).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import atomic_write_bytes, filter_net, net_state, read_net

RANKDIRS = ("LR", "RL", "TB", "BT")


def layer_label(lp: caffe_pb2.LayerParameter) -> str:
    """Name, type and the parameters that decide shapes (kernel, stride, pad, outputs), as draw_net.py."""
    extra = []
    if lp.type in ("Convolution", "Deconvolution"):
        p = lp.convolution_param
        k = p.kernel_size[0] if p.kernel_size else p.kernel_h
        s = p.stride[0] if p.stride else (p.stride_h or 1)
        pad = p.pad[0] if p.pad else p.pad_h
        extra.append(f"kernel {k}, stride {s}, pad {pad}, {p.num_output} out")
    elif lp.type == "Pooling":
        p = lp.pooling_param
        extra.append(f"{caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)} {p.kernel_size or p.kernel_h}, "
                     f"stride {p.stride}")
    elif lp.type == "InnerProduct":
        extra.append(f"{lp.inner_product_param.num_output} out")
    return "\n".join([lp.name, f"({lp.type})", *extra])


def graph(net: caffe_pb2.NetParameter) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """Nodes ``{id: (kind, label)}`` (kind ``layer`` or ``blob``) and edges, in the net's order."""
    nodes: dict[str, tuple[str, str]] = {}
    edges: list[tuple[str, str]] = []
    for lp in net.layer:
        lid = f"layer:{lp.name}"
        nodes[lid] = ("layer", layer_label(lp))
        for b in lp.bottom:
            nodes.setdefault(f"blob:{b}", ("blob", b))
            edges.append((f"blob:{b}", lid))
        for t in lp.top:
            if t in lp.bottom:  # in place: the same blob, drawn once
                continue
            nodes.setdefault(f"blob:{t}", ("blob", t))
            edges.append((lid, f"blob:{t}"))
    return nodes, edges


def to_dot(net: caffe_pb2.NetParameter, rankdir: str = "LR") -> str:
    nodes, edges = graph(net)
    lines = [f'digraph "{net.name or "net"}" {{', f"  rankdir={rankdir};"]
    for nid, (kind, label) in nodes.items():
        shape = 'shape=record, style=filled, fillcolor="#6495ED"' if kind == "layer" else \
            'shape=octagon, style=filled, fillcolor="#E0E0E0"'
        text = label.replace('"', '\\\\"').replace("\n", "\\\\n")
        lines.append(f'  "{nid}" [label="{text}", {shape}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in edges]
    return "\n".join(lines + ["}"]) + "\n"


def ranks(nodes: dict, edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest path from a source, over the DAG the net's order gives (edges always point forward)."""
    rank = {n: 0 for n in nodes}
    for a, b in edges:  # edges come in the net's layer order, so one pass suffices
        rank[b] = max(rank[b], rank[a] + 1)
    return rank


def to_image(net: caffe_pb2.NetParameter, fmt: str, rankdir: str = "LR") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes, edges = graph(net)
    rank = ranks(nodes, edges)
    by_rank: dict[int, list[str]] = {}
    for n in nodes:
        by_rank.setdefault(rank[n], []).append(n)
    depth, width = max(by_rank) + 1 if by_rank else 1, max((len(v) for v in by_rank.values()), default=1)
    pos = {}
    for r, members in by_rank.items():
        for i, n in enumerate(members):
            along, across = r * 2.2, (i - (len(members) - 1) / 2) * 1.6
            pos[n] = {"LR": (along, -across), "RL": (-along, -across), "TB": (across, -along),
                      "BT": (across, along)}[rankdir]
    horizontal = rankdir in ("LR", "RL")
    size = (max(4, depth * 1.9), max(3, width * 1.3)) if horizontal else (max(4, width * 1.9), max(3, depth * 1.3))
    fig, ax = plt.subplots(figsize=size)
    for a, b in edges:
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops=dict(arrowstyle="->", color="#555555", shrinkA=22, shrinkB=22))
    for n, (kind, label) in nodes.items():
        style = dict(boxstyle="round,pad=0.4", fc="#6495ED", ec="#1f3f7f") if kind == "layer" else \
            dict(boxstyle="ellipse,pad=0.3", fc="#E0E0E0", ec="#777777")
        ax.text(*pos[n], label, ha="center", va="center", fontsize=7, bbox=style)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.axis("off")
    ax.set_title(net.name or "net", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def draw_net(net: caffe_pb2.NetParameter, rankdir: str = "LR", ext: str = "png") -> bytes:
    """The picture as bytes: ``png``, ``svg`` or ``dot`` (Graphviz text)."""
    if rankdir not in RANKDIRS:
        raise CaffeError(f"rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    if ext == "dot":
        return to_dot(net, rankdir).encode()
    if ext not in ("png", "svg", "pdf"):
        raise CaffeError(f"cannot draw to '.{ext}': use .png, .svg, .pdf or .dot")
    return to_image(net, ext, rankdir)


def draw(args: argparse.Namespace) -> int:
    """The ``egomotion draw`` verb."""
    net = read_net(args.net)
    if args.phase:
        net = filter_net(net, net_state(args.phase), args.net)
    out = Path(args.output)
    data = draw_net(net, args.rankdir, out.suffix.lstrip(".").lower())
    atomic_write_bytes(out, data)
    print(f"wrote {out} ({len(net.layer)} layers)")
    return 0
