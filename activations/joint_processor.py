"""The attention processor of MMDiT joint attention (SD3 / SD3.5, FLUX.1): ``<block>.attn``.

In joint attention the image tokens and the text tokens attend to each other over one sequence
(SD3: [image, text]; FLUX: [text, image], FLUX's single-stream blocks receiving it already
concatenated). This processor computes what diffusers' ``JointAttnProcessor2_0`` (SD3) and
``FluxAttnProcessor`` (FLUX, double and single stream) compute, including the q/k norms and
FLUX's rotary embeddings, and runs the interventions attached to it at the same stages as the
U-Net ``HeadProcessor`` (``activations.intervention.STAGES``), which here are slices of the joint
attention (N image tokens, T text tokens, values after the q/k norms and the rotary embedding,
i.e. exactly what enters the dot products):

    q         image-token queries                       [b, h, N, d]
    k, v      text-token keys / values                  [b, h, T, d]
    probs     image-query x text-key slice of softmax(q kᵀ / √d) over ALL N + T keys
                                                        [b, h, N, T]; a row sums to the share of
              attention on the text (< 1), not to 1
    heads     per-head output of the image queries      [b, h, N, d]
    attn_out  the image stream's output after ``to_out`` [b, N, C] (FLUX single-stream blocks have
              no ``to_out``: the image tokens' merged heads, before the block's ``proj_out``)

Every edit acts on the image stream only: the text tokens' output of the module is always the one
diffusers computes (edited text keys/values are seen by the image queries, not by the text
queries). Edited ``probs`` are used as they are, not renormalised, as ``HeadProcessor`` does: the
image output is then ``probs' @ v_text + probs_image @ v_image``, the image-key part of the joint
softmax left as computed.

Paths, as in ``HeadProcessor``: idle (nothing attached or every gate closed) is diffusers' fused
SDPA over the joint sequence; observers of ``probs`` get the softmax computed beside the fused
path, whose output is left as it is; edits of q, k, v recompute the image rows with SDPA; edits of
``probs`` take the explicit path (within float rounding, <= 1e-5 in float32, of the fused one).

``SwapKV`` at joint sites takes another prompt's recorded text keys and values (``text_kv``), not
text embeddings: there is no fixed projection to put them through (``JointCall``). Not here yet:
attention masks together with interventions. ``activations.hooks`` (``attach`` / ``intervene``)
installs these processors through ``install_joint_processors``, which can also be called by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from activations.families import architecture_of, denoiser_of
from activations.intervention import Call, run_stage
from activations.processor import HeadProcessor
from common.errors import UsageError


class JointCall(Call):
    """The call context of a joint attention site (see ``Call``), which also holds the image
    tokens' keys and values (``k_image``, ``v_image`` [b, h, N, d]: the rest of what the image
    queries attend to). The module's text keys and values come from the text stream, which every
    block changes, not from one projection of the text encoder's states, so ``project`` is refused:
    another prompt's keys and values are read by drawing it (``analysis.mechanism.stream_text``,
    ``steering.EncodePrompt``) and given to ``SwapKV`` as ``text_kv``."""

    k_image: torch.Tensor | None = None
    v_image: torch.Tensor | None = None

    def project(self, encoder_hidden_states):
        raise UsageError(f"{self.site}: text embeddings have no fixed key projection at joint attention sites "
                         "(the text is a stream); give SwapKV the other prompt's recorded text_kv (steering.EncodePrompt)")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # [b, s, h*d] -> [b, s, h, d]


def _projections(attn, hidden_states, encoder_hidden_states):
    """(q, k, v) of the image (or joint) stream and of the text stream (None when there is none),
    each [b, s, h, d] after the q/k norms, as diffusers' processors compute them."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1) if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv") else None
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        text = None
        if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
            text = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states)
    q, k, v = (_split_heads(x, attn.heads) for x in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if text is not None:
        tq, tk, tv = (_split_heads(x, attn.heads) for x in text)
        if getattr(attn, "norm_added_q", None) is not None:
            tq = attn.norm_added_q(tq)
        if getattr(attn, "norm_added_k", None) is not None:
            tk = attn.norm_added_k(tk)
        text = tq, tk, tv
    return (q, k, v), text


class JointHeadProcessor(HeadProcessor):
    """Attention processor of one joint attention module; holds its interventions.

    ``text_tokens``: the text length of a FLUX single-stream module, whose input is the joint
    sequence already concatenated (``install_joint_processors`` sets it before each call of the
    block); the other modules read it from their ``encoder_hidden_states``. ``state``, ``level``
    (halvings of the latent that give the token grid), the branch codes and the grid are
    ``HeadProcessor``'s; only the call differs.
    """

    def __init__(self, site: str, state=None, level: int = 1, text_tokens: int | None = None, *, text_first: bool = False,
                 single_stream: bool = False):
        super().__init__(site, state, level)
        self.text_tokens = text_tokens
        self.text_first = text_first  # the family's order of the joint sequence (Architecture.text_first)
        self.single_stream = single_stream  # the module reads text and image joined (Block.single_stream)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
        active, by_stage = self._active()
        single, text_first = self.single_stream, self.text_first
        if encoder_hidden_states is None and not single:
            raise ValueError(f"{self.site}: joint attention without text tokens (encoder_hidden_states) is not a head site")
        if active and attention_mask is not None:
            raise UsageError(f"{self.site}: interventions together with an attention mask are not supported at joint attention sites yet")

        (q, k, v), text = _projections(attn, hidden_states, encoder_hidden_states)
        if single:
            if self.text_tokens is None:
                raise ValueError(f"{self.site}: a single-stream block's text length is unknown; install with install_joint_processors")
            n_text = int(self.text_tokens)
        else:
            n_text = encoder_hidden_states.shape[1]
            if text is not None:
                # SD3 puts the image tokens first, FLUX the text tokens
                first, second = (text, (q, k, v)) if text_first else ((q, k, v), text)
                q, k, v = (torch.cat([a, b], dim=1) for a, b in zip(first, second))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, S, d]
        seq = q.shape[2]
        txt, img = (slice(0, n_text), slice(n_text, seq)) if text_first else (slice(seq - n_text, seq), slice(0, seq - n_text))

        joint = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out_img = joint[:, :, img]

        if active:
            q_img, k_txt, v_txt = q[:, :, img], k[:, :, txt], v[:, :, txt]
            call = JointCall(self.site, "q", self.state, self._codes(q.shape[0], q.device), self._grid(q_img.shape[2]), attn,
                             q_img, k_txt, v_txt)
            call.k_image, call.v_image = k[:, :, img], v[:, :, img]
            for stage in ("q", "k", "v"):
                if stage in by_stage:
                    call.stage = stage
                    run_stage(by_stage[stage], getattr(call, stage), call)
            edited = call.q is not q_img or call.k is not k_txt or call.v is not v_txt
            q_img, k2, v2 = call.q, k, v
            if edited:
                # the image queries see the edited text keys/values; the text queries the originals
                pair = (lambda t, i: (t, i)) if text_first else (lambda t, i: (i, t))
                k2 = torch.cat(pair(call.k, k[:, :, img]), dim=2)
                v2 = torch.cat(pair(call.v, v[:, :, img]), dim=2)
            if any("probs" in iv.needs for iv in active):
                scores = torch.matmul(q_img.float(), k2.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
                full = scores.softmax(dim=-1)  # [b, h, N, S]: normalised over text and image keys
                call.probs = full[..., txt]
            probs = call.probs
            if "probs" in by_stage:
                call.stage = "probs"
                probs = run_stage(by_stage["probs"], call.probs, call)
            if any(not iv.observes for iv in by_stage.get("probs", ())):
                out_img = torch.matmul(probs.to(v.dtype), v2[:, :, txt]) + torch.matmul(full[..., img].to(v.dtype), v2[:, :, img])
            elif edited:
                out_img = F.scaled_dot_product_attention(q_img, k2, v2, dropout_p=0.0, is_causal=False)
            call.out = out_img
            if "heads" in by_stage:
                call.stage = "heads"
                out_img = run_stage(by_stage["heads"], out_img, call)

        image = rearrange(out_img, "b h n d -> b n (h d)").to(q.dtype)
        context = rearrange(joint[:, :, txt], "b h t d -> b t (h d)").to(q.dtype)
        if not single:
            image = attn.to_out[0](image.contiguous())
            image = attn.to_out[1](image)
        if active and "attn_out" in by_stage:
            call.stage = "attn_out"
            image = run_stage(by_stage["attn_out"], image, call)
        if single:
            return torch.cat([context, image], dim=1)
        if getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            context = attn.to_add_out(context.contiguous())
        return image, context


class JointProcessors:
    """The ``JointHeadProcessor``s installed on a transformer (``install_joint_processors``):
    ``processors`` by site name; ``remove()`` (or leaving a ``with`` block) puts diffusers'
    processors back."""

    def __init__(self, processors: dict[str, JointHeadProcessor], restore: list, handles: list):
        self.processors = processors
        self._restore = restore
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for attn, processor in self._restore:
            attn.set_processor(processor)
        self._handles, self._restore = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install_joint_processors(model, state=None) -> JointProcessors:
    """A ``JointHeadProcessor`` on every joint attention head site of an MMDiT (or of a pipeline
    holding one), named as ``activations.sites.list_sites`` names them. FLUX's single-stream blocks
    get a forward pre-hook that tells their processor the text length of each call."""
    denoiser = denoiser_of(model)
    arch = architecture_of(denoiser)
    if arch.processor != "joint":
        raise UsageError(f"{type(denoiser).__name__} has no joint attention ({arch.attention}); use activations.hooks for U-Nets")
    processors, restore, handles = {}, [], []
    for block in arch.blocks(denoiser):
        for name, attn in block.attentions:
            proc = JointHeadProcessor(name, state, text_first=arch.text_first, single_stream=block.single_stream)
            restore.append((attn, attn.processor))
            attn.set_processor(proc)
            processors[name] = proc
            if block.single_stream:
                handles.append(denoiser.get_submodule(block.name).register_forward_pre_hook(_text_length_hook(proc), with_kwargs=True))
    return JointProcessors(processors, restore, handles)


def _text_length_hook(proc: JointHeadProcessor):
    def hook(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        proc.text_tokens = ehs.shape[1]

    return hook


__all__ = ["JointCall", "JointHeadProcessor", "JointProcessors", "install_joint_processors"]
