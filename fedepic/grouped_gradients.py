"""Per-client minibatch gradients at one shared model from one batched forward and backward pass.

In the server-based per-step round every client's gradient is taken at the same global model, so the
n minibatches of B images can go through the model as one batch of n*B. The loss is the sum over
clients of each client's mean cross-entropy, whose gradient with respect to a layer's output is, row
by row, the gradient of that row's own client's mean loss. One ``torch.autograd.grad`` call asks for
dL/d(output) of every ``nn.Linear`` and ``nn.Conv2d`` layer only (autograd computes the input
gradients on the way, never a weight gradient); each client's weight gradient is then the sum over
its own rows of grad_output^T @ input, batched matrix products over the clients: Linear directly,
one product per layer; Conv2d on the unfolded (im2col) input with the B rows and the output
positions folded into one contraction, a few clients per product. The unfolding is a strided view of the zero-padded input, laid out for
the product by one copy (``F.unfold`` and then the per-client layout would copy it twice). Biases
are the sums of grad_output over the client's rows (and positions).

Cost: the FLOPs of one batched backward pass (the weight products are the batched backward's, split
by client); memory: the batched activations plus the unfolded input of one convolution, C*kh*kw*L
floats per image for L output positions, for a few clients at a time (``UNFOLD_BYTES``).

The gradient with respect to an output is taken at its autograd edge as recorded in the forward
hook, before any later in-place operation (``ReLU(inplace=True)``) rewrites that tensor's history.

Supported: models whose every parameter lives in an ``nn.Linear`` or an ``nn.Conv2d`` (groups 1,
zero padding given as numbers), with no buffers but the fixed ``mean``/``std`` normalisation and no
dropout of torch's (fedepic's mlp, cnn, cnn_mnist and mnist_net). ``fedepic.dropout.MaskedDropout``
is supported: its given masks (per client, [n, B, ...]) multiply the batched activations row by row,
which autograd carries into each layer's grad_output. :func:`supported` tells; otherwise, or when a layer is
called in a way the kernel does not expect, :func:`grouped_gradients` returns None and the caller
takes the general path (``fedepic.stacked.stacked_gradients``'s vmap).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call

from fedepic.models import FIXED_BUFFERS
from fedepic.train import float_images

# the unfolded input of a convolution is laid out a few clients at a time in one buffer of at most this
# many bytes: it bounds the memory, and the pages of one buffer are touched again instead of a fresh
# allocation's being mapped in, page by page, for every chunk
UNFOLD_BYTES = 16 * 2**20
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _layer_supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    return False


def supported(model: nn.Module) -> bool:
    """Whether :func:`grouped_gradients` handles ``model``: every parameter belongs to a supported
    Linear/Conv2d layer under its own name (no parameter shared between layers), the only buffers
    are the fixed normalisation ones, and there is no dropout. A walk over the modules (cheap)."""
    if any(name not in FIXED_BUFFERS for name, _ in model.named_buffers()):
        return False
    owned = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _DROPOUT):
            return False
        own = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]
        if own and not _layer_supported(module):
            return False
        owned.update(own)
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return owned == names and len(names) == len(list(model.parameters()))


def _linear_grads(inputs: Tensor, grad_out: Tensor, n: int, has_bias: bool) -> list[Tensor]:
    """[n, out, in] (and [n, out]): per client, the sum over its rows of grad_out^T @ input."""
    a = inputs.reshape(n, -1, inputs.shape[-1])
    g = grad_out.reshape(n, -1, grad_out.shape[-1])
    out = [torch.bmm(g.transpose(1, 2), a)]
    if has_bias:
        out.append(g.sum(1))
    return out


def _windows(layer: nn.Conv2d, inputs: Tensor) -> Tensor:
    """The kernel windows of ``inputs`` [N, C, H, W] as a strided view [N, C, Ho, Wo, kh, kw] (no copy
    but the zero padding): the unfolded (im2col) input before it is laid out."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    x = F.pad(inputs, (pw, pw, ph, ph)) if ph or pw else inputs
    batch, channels, height, width = x.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    return x.as_strided((batch, channels, out_h, out_w, kh, kw),
                        (s_n, s_c, s_h * sh, s_w * sw, s_h * dh, s_w * dw), x.storage_offset())


def _conv_grads(layer: nn.Conv2d, inputs: Tensor, grad_out: Tensor, n: int, has_bias: bool) -> list[Tensor]:
    """[n, *weight.shape] (and [n, out]): per client, the unfolded input contracted with grad_out over
    its rows and output positions together, a few clients at a time through one buffer of at most
    ``UNFOLD_BYTES`` (one client's unfolded input at least)."""
    windows = _windows(layer, inputs)  # [n*B, C, Ho, Wo, kh, kw]
    batch, channels, out_h, out_w, kh, kw = windows.shape
    per, out_channels, positions = batch // n, grad_out.shape[1], out_h * out_w
    size = channels * kh * kw
    windows = windows.reshape(n, per, channels, out_h, out_w, kh, kw)
    g = grad_out.reshape(n, per, out_channels, positions).transpose(1, 2).reshape(n, out_channels, per * positions)
    client = size * per * positions
    step = max(1, min(n, UNFOLD_BYTES // (client * windows.element_size())))
    buffer = windows.new_empty(step * client)
    weights = []
    for start in range(0, n, step):
        count = min(step, n - start)
        # one copy lays the chunk's windows out as [clients, C*kh*kw, B*Ho*Wo]
        cols = buffer[:count * client].view(count, channels, kh, kw, per, out_h, out_w)
        cols.copy_(windows[start:start + count].permute(0, 2, 5, 6, 1, 3, 4))
        weights.append(torch.bmm(cols.view(count, size, per * positions), g[start:start + count].transpose(1, 2)))
    out = [torch.cat(weights).transpose(1, 2).reshape(n, *layer.weight.shape)]
    if has_bias:
        out.append(g.sum(2))
    return out


def grouped_gradients(model: nn.Module, flat: Tensor, xb: Tensor, yb: Tensor,
                      masks: Optional[dict[str, Tensor]] = None) -> Optional[Tensor]:
    """Gradient [n, D] of ``cross_entropy(model(xb[k]), yb[k])`` (mean over the B rows) for every
    client k, all at the one point ``flat`` [D] (``fedepic.stacked.parameter_layout``'s order), with
    minibatches ``xb`` [n, B, ...] (uint8, or float in [0, 1]) and labels ``yb`` [n, B]; no weight
    decay (the caller adds it). None when the model is not :func:`supported` or one of its layers was
    called in a way the kernel does not handle (the caller then takes the general path).

    ``masks``: the clients' dropout masks {name: [n, B, ...]} (``fedepic.dropout``), for a model with
    dropout in training mode. The model's mode, its parameters and their ``requires_grad`` are not
    touched: the forward pass is a ``functional_call`` at ``flat``; the hooks are always removed."""
    from fedepic.stacked import parameter_layout, split_flat  # stacked imports this module

    if flat.dim() != 1 or not supported(model):
        return None
    layout = parameter_layout(model)
    n, per = yb.shape[0], yb.shape[1]
    batch = n * per
    images = float_images(xb).reshape(batch, *xb.shape[2:])
    point = flat.detach().requires_grad_(True)
    params = {name: value[0] for name, value in split_flat(point[None], layout).items()}
    fixed = {k: v for k, v in model.state_dict().items() if k in FIXED_BUFFERS}
    layers = {module: prefix for prefix, module in model.named_modules() if _layer_supported(module)}
    calls = []  # (layer prefix, layer, its input, the input's version, the output's gradient edge)
    usable = True

    def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
        nonlocal usable
        x = args[0] if args else None
        if (len(args) != 1 or not isinstance(x, Tensor) or not isinstance(output, Tensor)
                or x.shape[0] != batch or output.shape[0] != batch or not output.requires_grad
                or (type(module) is nn.Conv2d and x.dim() != 4)):
            usable = False
            return
        calls.append((layers[module], module, x, x._version, get_gradient_edge(output)))

    hooks = [module.register_forward_hook(capture) for module in layers]
    try:
        with torch.enable_grad():
            given = {name: m.reshape(batch, *m.shape[2:]) for name, m in (masks or {}).items()}
            logits = functional_call(model, {**params, **fixed, **given}, (images,))
            loss = F.cross_entropy(logits.reshape(batch, -1), yb.reshape(batch), reduction="sum") / per
    finally:
        for hook in hooks:
            hook.remove()
    # a layer input changed in place after the layer read it no longer holds what the layer saw
    if not usable or not calls or any(x._version != version for _, _, x, version, _ in calls):
        return None
    # a layer whose output the loss does not use gets None: no contribution (a zero gradient)
    grad_outs = torch.autograd.grad(loss, [edge for *_, edge in calls], allow_unused=True)
    grads: dict[str, Tensor] = {}
    with torch.no_grad():
        for (prefix, layer, x, _, _), g in zip(calls, grad_outs):
            if g is None:
                continue
            has_bias = layer.bias is not None
            if type(layer) is nn.Linear:
                pieces = _linear_grads(x, g, n, has_bias)
            else:
                pieces = _conv_grads(layer, x, g, n, has_bias)
            for suffix, piece in zip(("weight", "bias"), pieces):
                name = f"{prefix}.{suffix}" if prefix else suffix
                grads[name] = grads[name] + piece if name in grads else piece  # a layer called twice
        return torch.cat([grads[name].reshape(n, -1) if name in grads else flat.new_zeros(n, shape.numel())
                          for name, shape in layout], dim=1)
