"""InternViT-6B as NVLM-D-72B stores it: 45 pre-norm blocks with QK-norm and layer-scale, attention padded with
dummy heads, no final norm.

The dummy heads (7 in NVLM's checkpoint) widen q, k and v from 25 to 32 heads of 128 channels. The QK-RMSNorm
of the reference normalises all 32 heads of a token jointly, with the variance taken over the 25 real heads
only, so that the padding never changes the real heads; every attention path here computes that same function.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN, GELUActivation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_nvlm_d import InternVisionConfig

logger = logging.get_logger(__name__)


class InternRMSNorm(nn.Module):
    """RMSNorm whose variance may be read from the first `variance_size` channels only.

    The QK-norm is 4096 wide (32 padded heads) but its variance covers the 3200 real channels: the released
    checkpoint was made by padding a 25-head model, and this keeps its output unchanged.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, variance_size: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.variance_size = variance_size or hidden_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalises `hidden_states`, which may be narrower than the weight (the real heads alone, when the
        dummy heads are skipped): the weight's leading channels apply."""
        if _records_autograd(hidden_states, self.weight) or hidden_states.dtype != self.weight.dtype:
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states[..., : self.variance_size].pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight[: hidden_states.shape[-1]] * hidden_states.to(input_dtype)
        return self._forward_in_fresh_tensors(hidden_states)

    def _forward_in_fresh_tensors(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The same operations, with the same bits, writing into tensors this call made rather than allocating a
        new one for each step: one full-size allocation instead of three in float32. On the CPU every large
        allocation is fresh memory from the kernel, and its page faults cost as much as the arithmetic here."""
        input_dtype = hidden_states.dtype
        hidden = hidden_states.to(torch.float32)
        squares = hidden[..., : self.variance_size].pow(2)
        variance = squares.mean(-1, keepdim=True)
        if hidden is not hidden_states:
            scratch = hidden  # the float32 copy of a lower-precision input
        else:
            scratch = squares if squares.shape == hidden.shape else None  # never the caller's tensor
        normed = torch.mul(hidden, torch.rsqrt(variance + self.variance_epsilon), out=scratch)
        normed = normed.to(input_dtype)
        return normed.mul_(self.weight[: normed.shape[-1]])  # weight * x == x * weight, bit for bit

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, variance_size={self.variance_size}"


def _records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records operations on these tensors. Where it does not (inference: `torch.no_grad`, or
    frozen weights and inputs), a fresh intermediate may be overwritten in place: it saves an allocation and gives
    the same bits."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's attention, operation for operation: q is scaled before the product and the softmax runs
    in the working dtype (bf16 for a bf16 model), as NVLM-D's published numbers were computed."""
    attn_weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class InternVisionEmbeddings(nn.Module):
    """Patch embedding of a tile, a class token in front, and learned absolute positions (not interpolated:
    tiles are always `image_size` square)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, self.embed_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))  # [tiles, width, grid, grid]
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # [tiles, grid * grid, width], row-major
        class_embeds = self.class_embedding.expand(patch_embeds.shape[0], 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings.add_(self.position_embedding.to(target_dtype))  # into cat's fresh output: no allocation


def _holds_its_values(tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether `tensor` really holds all of its values in this process, so that reading them is safe and means
    something: not on the meta device (built empty, or offloaded by accelerate), not a shard placeholder (DeepSpeed
    ZeRO-3 leaves an empty tensor in place of a partitioned parameter), not a tensor subclass (FSDP2's DTensor,
    quantized parameters)."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta" and tensor.shape == shape


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` is a bare `nn.Linear` whose weight may be sliced and used through `F.linear`: not a
    subclass or wrapper (peft LoRA, bitsandbytes), with no hooks that expect to see the call (user hooks,
    DeepSpeed's parameter gathering, accelerate's device alignment and offloading, `_hf_hook`)."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not module._backward_hooks
        and not module._backward_pre_hooks
        and not hasattr(module, "_hf_hook")
    )


def _detect_after_load(module: InternAttention, incompatible_keys) -> None:
    """`load_state_dict` post-hook: the weights may have changed wholesale, so decide again."""
    module.detect_silent_dummy_heads()


class InternAttention(nn.Module):
    """Bidirectional multi-head attention over a tile's tokens, with heads padded by `num_dummy_heads`.

    `qkv` rows hold q, k and v blocks of `(heads + dummy heads) * head_dim` rows each, real heads first; `proj`
    columns follow the same order.

    A dummy head is silent when its value rows (and value bias) are zero, or its `proj` columns are zero: its
    contribution to the output is then exactly zero, whatever the input. In the released checkpoint all seven
    are silent, and computing only the 25 real heads is the same function for 22% fewer attention FLOPs.
    `dummy_heads_silent` records that fact for the current weights. It is a plain bool, so `torch.compile` guards
    on it; it is set by `detect_silent_dummy_heads`, which `InternVisionModel` calls when weights change
    wholesale (`eval()`, which `from_pretrained` calls at the end of loading, and `load_state_dict`); see
    `InternVisionModel.detect_silent_dummy_heads` for when to call it yourself.

    The dummy heads are skipped only where that is exact (`_skips_dummy_heads`); otherwise, and always when in
    doubt, all heads are computed through the `qkv` and `proj` modules themselves.
    """

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.head_dim = config.head_dim
        self.num_real_heads = config.num_attention_heads
        self.num_heads = config.num_attention_heads + config.num_dummy_heads
        self.padded_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_dropout

        self.qkv = nn.Linear(self.embed_dim, 3 * self.padded_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.padded_dim, config.layer_norm_eps, variance_size=self.embed_dim)
            self.k_norm = InternRMSNorm(self.padded_dim, config.layer_norm_eps, variance_size=self.embed_dim)
        self.proj = nn.Linear(self.padded_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)
        self.dummy_heads_silent = False  # fresh (random) weights: nothing is known until detected
        self.register_load_state_dict_post_hook(_detect_after_load)

    def __setattr__(self, name: str, value) -> None:
        if name in ("qkv", "proj"):
            # A replaced module (peft wrapping a LoRA around it, or `merge_and_unload` putting back a base layer
            # with merged weights) has weights nothing was decided about.
            super().__setattr__("dummy_heads_silent", False)
        super().__setattr__(name, value)

    def detect_silent_dummy_heads(self) -> bool:
        """Read the weights and record whether every dummy head is silent (one host synchronisation). Weights that
        are not really here (meta, offloaded, partitioned, a tensor subclass) or modules that are not plain
        `nn.Linear` are never read: the answer is then False, and all heads are computed."""
        self.dummy_heads_silent = self._weights_show_silent_dummy_heads()
        return self.dummy_heads_silent

    def _weights_show_silent_dummy_heads(self) -> bool:
        num_dummy = self.num_heads - self.num_real_heads
        if num_dummy == 0 or not (type(self.qkv) is nn.Linear and type(self.proj) is nn.Linear):
            return False
        linear_tensors = [
            (self.qkv.weight, (3 * self.padded_dim, self.embed_dim)),
            (self.qkv.bias, (3 * self.padded_dim,)),
            (self.proj.weight, (self.embed_dim, self.padded_dim)),
        ]
        if not all(_holds_its_values(t, shape) for t, shape in linear_tensors if t is not None):
            return False
        with torch.no_grad():
            real_dim = self.num_real_heads * self.head_dim
            dummy_values = slice(2 * self.padded_dim + real_dim, 3 * self.padded_dim)  # the v block's dummy rows
            values_zero = ~self.qkv.weight[dummy_values].reshape(num_dummy, -1).any(dim=1)
            if self.qkv.bias is not None:
                values_zero &= ~self.qkv.bias[dummy_values].reshape(num_dummy, -1).any(dim=1)
            outputs = self.proj.weight[:, real_dim:].reshape(self.embed_dim, num_dummy, self.head_dim)
            outputs_zero = ~outputs.any(dim=2).any(dim=0)
            return bool((values_zero | outputs_zero).all())

    def _skips_dummy_heads(self) -> bool:
        """Whether this call computes the real heads only. That needs the dummy heads known silent and `qkv` and
        `proj` plain (sliceable) linear layers. If their weights are trainable, it also needs the model in eval
        mode with gradients off: in training an optimiser may bring a dummy head to life, and the gradient a
        weight receives through a head that is silent by one factor need not be zero. Frozen weights cannot move,
        so a frozen tower (InternVL's usual fine-tuning) skips in training too. Only Python attributes are read
        here: no host synchronisation, and `torch.compile` guards on each of them."""
        if not (self.dummy_heads_silent and _is_plain_linear(self.qkv) and _is_plain_linear(self.proj)):
            return False
        weights = (self.qkv.weight, self.qkv.bias, self.proj.weight)
        trainable = any(weight is not None and weight.requires_grad for weight in weights)
        return not trainable or not (self.training or torch.is_grad_enabled())

    def _qkv(self, hidden_states: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        """q, k and v of the first `width` channels of each block."""
        if width == self.padded_dim:
            return self.qkv(hidden_states).chunk(3, dim=-1)
        weight, bias = self.qkv.weight, self.qkv.bias
        blocks = [slice(b * self.padded_dim, b * self.padded_dim + width) for b in range(3)]
        return tuple(F.linear(hidden_states, weight[rows], None if bias is None else bias[rows]) for rows in blocks)

    def _proj(self, attn_output: torch.Tensor, width: int) -> torch.Tensor:
        """`proj` applied to the first `width` channels (the others being the silent heads')."""
        if width == self.padded_dim:
            return self.proj(attn_output)
        return F.linear(attn_output, self.proj.weight[:, :width], self.proj.bias)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        num_heads = self.num_real_heads if self._skips_dummy_heads() else self.num_heads
        width = num_heads * self.head_dim
        query, key, value = self._qkv(hidden_states, width)  # each [tiles, tokens, width]
        if self.qk_normalization:
            query, key = self.q_norm(query), self.k_norm(key)

        head_shape = (batch_size, seq_len, num_heads, self.head_dim)
        query, key, value = (t.reshape(head_shape).transpose(1, 2) for t in (query, key, value))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scale,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, width)
        return self.proj_drop(self._proj(attn_output, width)), attn_weights


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability `drop_prob` and
    the kept ones are scaled by 1 / (1 - drop_prob), so the expected output is unchanged; identity in eval.
    InternVL fine-tunes the ViT with `drop_path_rate` 0.1, growing linearly from 0 at the first layer."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)  # one draw per sample (tile)
        mask = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            mask = mask / keep_prob
        return hidden_states * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self._gelu_in_place(hidden_states):
            torch.ops.aten.gelu_(
                hidden_states
            )  # the same kernel as F.gelu, into fc1's fresh [tiles, tokens, 4 x width]
        else:
            hidden_states = self.act(hidden_states)
        return self.fc2(hidden_states)

    def _gelu_in_place(self, fc1_output: torch.Tensor) -> bool:
        """Whether the activation is plain exact GELU and autograd does not need fc1's output: then it may
        overwrite it, which saves the layer's largest allocation."""
        act = self.act
        return (
            type(act) is GELUActivation
            and act.act is F.gelu
            and not act._forward_hooks
            and not act._forward_pre_hooks
            and not self.fc1._forward_hooks  # a hook may hold on to fc1's output
            and not _records_autograd(fc1_output)
        )


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    """norm -> attention -> layer-scale -> drop-path -> residual, then the same with the MLP."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = InternRMSNorm(config.hidden_size, config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.norm2 = InternRMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        # hidden + branch, added into the branch: the branch (layer-scale product, or drop-path's) is a fresh tensor
        # of this layer whose values no backward needs, so this saves an allocation and gives the same bits
        attn_branch = self.drop_path1(self._layer_scale(self.attn, self.attn(self.norm1(hidden_states), **kwargs)[0]))
        hidden_states = attn_branch.add_(hidden_states)
        mlp_branch = self.drop_path2(self._layer_scale(self.mlp, self.mlp(self.norm2(hidden_states))))
        return mlp_branch.add_(hidden_states)

    def _layer_scale(self, branch: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """`output * ls`, in place in `output` (the branch's fresh tensor) where autograd does not record it and no
        forward hook in the branch (its own or a submodule's) may hold on to it: the same bits, one allocation fewer."""
        scale = self.ls1 if branch is self.attn else self.ls2
        hooked = any(module._forward_hooks for module in branch.modules())  # one may hold the output
        if _records_autograd(output, scale) or hooked or output.dtype != scale.dtype:
            return output * scale
        return output.mul_(scale)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        # computed on the CPU whatever the default device, so that the tower also builds under `torch.device("meta")`
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config, rate) for rate in rates])

    @property
    def gradient_checkpointing(self) -> bool:
        """InternVL's switch for activation checkpointing of the ViT (its training code sets it to True): it
        reads and sets the layers' own flags, the ones `activation_checkpointing_enable()` sets, so that both
        ways agree. It applies in training only, with the settings `activation_checkpointing_enable` chose, or
        else non-reentrant `torch.utils.checkpoint` (transformers' default)."""
        return any(layer.gradient_checkpointing for layer in self.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        for layer in self.layers:
            # never set, or left bare by `activation_checkpointing_disable()` (bare `checkpoint` warns, and raises
            # in recent torch, without `use_reentrant`)
            if enable and getattr(layer, "_gradient_checkpointing_func", checkpoint) is checkpoint:
                layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            layer.gradient_checkpointing = enable

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False, **kwargs
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    config: InternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, InternVisionEmbeddings):
            init.normal_(module.class_embedding, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)


class InternVisionModel(InternVisionPreTrainedModel):
    """Embeddings and encoder only: NVLM-D has no final norm and no pooling layer; `pooler_output` is the
    class token of the last hidden state."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def detect_silent_dummy_heads(self) -> int:
        """Read the attention weights and decide, layer by layer, whether the dummy heads are silent (their value
        rows or their `proj` columns zero, as in the released checkpoint) and may be skipped. Returns the number
        of layers that will skip them (where exact: see `InternAttention._skips_dummy_heads`).

        It runs for you when weights change wholesale: at `eval()` (which `from_pretrained` calls once the weights
        are loaded) and after `load_state_dict`. Call it (or `eval()`) yourself after writing attention weights any
        other way — in place through `param.data` or `copy_`, accelerate's `set_module_tensor_to_device`, an
        optimiser step taken in eval mode — before running in eval mode or with frozen attention weights;
        otherwise a head made live by such a write would still be skipped. Training with trainable weights
        computes every head and needs no call. Weights that are not really in this process (meta, offloaded,
        sharded) are not read: those layers compute every head.
        """
        return sum(layer.attn.detect_silent_dummy_heads() for layer in self.encoder.layers)

    def train(self, mode: bool = True) -> InternVisionModel:
        """Also decides again whether the dummy heads are silent when switching to eval mode (`eval()`)."""
        super().train(mode)
        if not mode:
            self.detect_silent_dummy_heads()
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """InternVL's switch, set on the vision model by its training code: the same as the encoder's."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.encoder.gradient_checkpointing = enable

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """`pixel_values` [tiles, 3, image_size, image_size] -> last hidden state [tiles, 1 + patches, width];
        `hidden_states` (when asked for) holds the embeddings and each layer's output."""
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embeddings = self.embeddings(pixel_values)
        last_hidden_state, hidden_states = self.encoder(embeddings, output_hidden_states=output_hidden_states, **kwargs)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0, :],
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()
