"""The LM head as one linear map, for ``fused=True``: ``head(x) == F.linear(x', W', b')``.

The fused loss never calls the head: it needs the weight (and bias) whose product with the hidden
states gives exactly the logits the head would have given. For a plain ``nn.Linear`` that is the
head's own weight. Wrappers that PEFT puts on the head are seen through exactly:

- LoRA (``peft.tuners.lora.Linear``): ``W x + s·B(A(dropout x))`` is one product of the concatenations
  ``[x, s·A(dropout x)]`` and ``[W, B]``, so values and gradients (LoRA factors, base weight, hidden
  states) are those of the unfused head, LoRA dropout included; merged adapters are in ``W`` already.
- ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the active trainable copy.

Anything else whose output the weight alone does not give (DoRA and other LoRA variants, quantized
or custom linears, forward hooks, accelerate's device hooks) is refused with a ValueError that names
it and the fix: a silently wrong loss is never an option.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

# hidden (..., H) -> (hidden' (..., H'), weight (V, H'), bias (V,) or None)
LinearParts = tuple[Tensor, Tensor, Optional[Tensor]]
HeadMap = Callable[[Tensor], LinearParts]

_FIX = ("use fused=False, or merge the adapter into the head before training with it fused "
        "(peft: model.merge_and_unload()), or leave lm_head out of the adapter's target_modules")


def peft_base_model(model: Any) -> Any:
    """The transformers model inside a ``PeftModel`` (the model itself when it is not one)."""
    peft = sys.modules.get("peft")  # a PeftModel cannot exist unless peft was imported
    wrappers = tuple(getattr(peft, name) for name in ("PeftModel", "PeftMixedModel") if hasattr(peft, name))
    if wrappers and isinstance(model, wrappers):
        return model.get_base_model()
    return model


def linear_head(head: Any, where: str = "lm_head", in_own_call: bool = False) -> HeadMap:
    """The map ``hidden -> (hidden', weight, bias)`` with ``F.linear(hidden', weight, bias) == head(hidden)``.

    Raises ValueError naming ``where`` (e.g. ``"LlamaForCausalLM.lm_head"``) when the head is not
    something whose output the fused loss can reproduce exactly. Cheap: call it at every forward, so
    that an adapter added after ``patch`` is seen. ``in_own_call``: read from inside the head's own
    call, where hooks have gathered its weight (an FSDP2 unit, a ZeRO-3 head), and its hooks are theirs.
    """
    _check_called_as_defined(head, where, in_own_call)
    if _is_plain_linear(head):
        return lambda hidden: (hidden, head.weight, head.bias)
    peft = sys.modules.get("peft")
    if peft is not None:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.utils import ModulesToSaveWrapper

        if type(head) is LoraLinear:
            return _lora_head(head, where)
        if type(head) is ModulesToSaveWrapper:
            return linear_head(_active_module(head), f"{where} (active module of {type(head).__name__})")
    weight = getattr(head, "weight", None)
    raise ValueError(f"fused=True cannot reproduce the LM head {where}: it is a {_describe(head)} (weight: "
                     f"{_describe(weight)}), not a linear layer (or LoRA on one) whose output is "
                     f"hidden @ weight.T + bias on plain tensors; {_FIX}")


def _lora_head(head: Any, where: str) -> HeadMap:
    """LoRA on a linear head: ``W x + sum_a s_a·B_a(A_a(dropout_a x))`` (peft's ``lora.Linear.forward``)."""
    if head.merged:
        if head.disable_adapters:  # peft would unmerge the weights in its forward: a side effect we do not copy
            raise ValueError(f"fused=True: the LoRA adapter on {where} is merged but disabled; call "
                             f"unmerge_adapter() (or enable the adapter) before the forward")
        return linear_head(head.base_layer, f"{where}.base_layer")
    base = linear_head(head.base_layer, f"{where}.base_layer")
    if head.disable_adapters:
        return base
    adapters = [name for name in head.active_adapters if name in head.lora_A.keys()]
    for name in adapters:
        variant = getattr(head, "lora_variant", {}).get(name)
        if variant is None and (getattr(head, "use_dora", {}).get(name) or
                                name in getattr(head, "lora_magnitude_vector", {})):
            variant = "DoRA"  # peft before lora_variant existed
        if variant is not None:
            kind = variant if isinstance(variant, str) else type(variant).__name__
            raise ValueError(f"fused=True cannot reproduce the LM head {where}: adapter {name!r} is a LoRA "
                             f"variant ({kind}, e.g. DoRA), not a low-rank sum; {_FIX}")
        up = head.lora_B[name]
        _check_called_as_defined(up, f"{where}.lora_B[{name!r}]")
        if not _is_plain_linear(up):
            raise ValueError(f"fused=True cannot reproduce the LM head {where}: its lora_B[{name!r}] is a "
                             f"{_describe(up)}, not a linear layer; {_FIX}")
    cast_input = getattr(head, "cast_input_dtype_enabled", True)

    def parts(hidden: Tensor) -> LinearParts:
        x, weight, bias = base(hidden)
        xs, weights = [x], [weight]
        for name in adapters:
            down, up = head.lora_A[name], head.lora_B[name]
            scaling = head.scaling[name]
            h = hidden.to(down.weight.dtype) if cast_input else hidden  # as peft casts the LoRA input
            xs.append(down(head.lora_dropout[name](h)) * scaling)   # (..., r): the scaling rides on the input
            weights.append(up.weight)                                 # (V, r)
            if up.bias is not None:                                   # lora_bias=True: s·b_B joins the bias
                bias = up.bias * scaling if bias is None else bias + up.bias * scaling
        dtype = _common_dtype(xs + weights)
        return (torch.cat([t.to(dtype) for t in xs], dim=-1),         # (..., H + sum r)
                torch.cat([t.to(dtype) for t in weights], dim=1),     # (V, H + sum r)
                bias)

    return parts


def _active_module(wrapper: Any) -> Any:
    """The module a ``ModulesToSaveWrapper`` runs (its forward's rule): the first active adapter's copy."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(name not in wrapper.modules_to_save for name in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _is_plain_linear(module: Any) -> bool:
    """An ``nn.Linear`` computing ``F.linear`` on ordinary tensors (a quantized or sharded weight is a
    tensor subclass whose product the fused loss would not reproduce)."""
    plain = (torch.Tensor, nn.Parameter)
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and type(module.weight) in plain and (module.bias is None or type(module.bias) in plain))


def gathered_in_own_call(module: Any) -> bool:
    """Whether ``module``'s weight is whole only inside its own call, where hooks gather it: a unit of
    its own under FSDP2 (``fully_shard``), or a head whose weight DeepSpeed ZeRO-3 partitions."""
    if hasattr(getattr(module, "weight", None), "ds_id"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _gathering_hook(hook: Any) -> bool:
    """FSDP2's hooks (methods of its state, wrapped for a group of modules sharded together) or
    DeepSpeed ZeRO-3's (functions of its modules)."""
    wrapped = hook
    while wrapped is not None:  # the group's wrapper, then FSDP's own decorators: one of them is bound
        if type(getattr(wrapped, "__self__", None)).__name__ == "FSDPState":
            return True
        wrapped = getattr(wrapped, "__wrapped__", None)
    return str(getattr(hook, "__module__", "")).startswith("deepspeed.")


def _check_called_as_defined(module: Any, where: str, in_own_call: bool = False) -> None:
    """The fused loss reads the module's weights instead of calling it: nothing may intervene in the
    call (but FSDP's own hooks, when the loss runs inside the call they gather the weight for)."""
    if in_own_call:
        own = [h for table in (module._forward_hooks, module._forward_pre_hooks) for h in table.values()]
        if not all(_gathering_hook(h) for h in own):
            raise ValueError(f"fused=True cannot reproduce the LM head {where}: besides the hooks that gather its "
                             f"weight (FSDP's, ZeRO-3's), it has forward hooks, which the fused loss would bypass; "
                             f"remove them or use fused=False")
        return
    if "forward" in getattr(module, "__dict__", {}):
        raise ValueError(f"fused=True cannot reproduce the LM head {where}: its forward is replaced on the "
                         f"instance (e.g. accelerate's device-map or offload hooks), which the fused loss would "
                         f"bypass; {_FIX}")
    hooks = getattr(module, "_forward_hooks", None), getattr(module, "_forward_pre_hooks", None)
    if any(hooks):
        raise ValueError(f"fused=True cannot reproduce the LM head {where}: it has forward hooks (e.g. "
                         f"weight normalisation, parameter gathering, peft's mixed-batch adapter_names), which "
                         f"the fused loss would bypass; remove them or use fused=False")


def _common_dtype(tensors: list) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _describe(module: Any) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"
