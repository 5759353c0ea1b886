"""``SparseCoder``: the SAE base class, its train-step contract, and its files.

Parameters and file layout follow EleutherAI's sparsify so that the two load each other's TopK
SAEs: ``encoder.weight`` [m, d], ``encoder.bias`` [m], ``W_dec`` [m, d], ``b_dec`` [d] in
``sae.safetensors``, the config plus ``d_in`` in ``cfg.json``, one folder per site. Architectures
with a threshold add a ``threshold`` tensor.

Forward pass (all architectures): pre = W_enc (x - b_dec) + b_enc; f = activation(pre);
x_hat = W_dec^T f + b_dec (Bricken et al. 2023; Gao et al. 2024).

``SAE`` is an alias: ``SAE.from_pretrained(path_or_hub_id)`` returns the right subclass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import einops
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.errors import UsageError
from sae import saelens
from sae.config import Placement, SparseCoderConfig
from sae.kernels import gather_pre_acts, row_layout, sparse_decode
from sae.latents import Latents
from sae.registry import get_architecture

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"


@dataclass
class TrainContext:
    """What the trainer tells an architecture at each step."""

    dead_mask: Tensor | None = None
    """[m] bool: latents that have not fired for ``dead_tokens_threshold`` tokens (for AuxK)."""

    progress: float = 1.0
    """Fraction of training done, in [0, 1] (for coefficient warm-ups)."""

    process_group: object | None = None
    """Set when the batch is split over ranks and an architecture must see the global batch
    (BatchTopK); None for a single process."""


@dataclass
class TrainOutput:
    """The train-step contract: reconstruction, codes, and named losses whose sum is minimised."""

    recon: Tensor
    """[n, d] reconstruction of the input."""

    latents: Latents
    """Codes of the batch (detached use only: l0, firing statistics)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    """Weighted loss terms, e.g. {'mse': ..., 'auxk': ...}; the training loss is their sum."""

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())


class SparseCoder(nn.Module):
    """Base SAE. Subclasses implement ``encode`` and ``train_step`` and register themselves."""

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SparseCoderConfig, d_in: int, *, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg.validate(d_in)
        self.cfg = cfg
        self.placement = Placement()  # where it belongs; set by the trainer, restored from cfg.json
        self.source: Path | None = None  # the folder it was loaded from, if any
        self.d_in = d_in
        self.num_latents = cfg.resolved_num_latents(d_in)
        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(self.num_latents, d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows: random unit directions; encoder = decoder transpose (Gao et al. 2024, Sec 2.4;
        Conerly et al. 2024); zero biases."""
        self.W_dec.normal_()
        self.set_decoder_norm_to_unit_norm()
        self.encoder.weight.copy_(self.W_dec)
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Tensor:
        """[n, d] -> [n, m] encoder pre-activations W_enc (x - b_dec) + b_enc."""
        self.check_width(x)
        return F.linear(x.to(self.dtype) - self.b_dec, self.encoder.weight, self.encoder.bias)

    def check_width(self, x: Tensor) -> None:
        """Refuse inputs of another width: reshaping them to [-1, d_in] would silently merge tokens."""
        if x.shape[-1] != self.d_in:
            where = f" (trained on {self.placement.site})" if self.placement.site else ""
            raise UsageError(f"this SAE takes inputs of width d_in={self.d_in}{where}, got width {x.shape[-1]} "
                             f"(shape {list(x.shape)})")

    def encode(self, x: Tensor) -> Latents:
        """Inference-time codes of x [n, d]."""
        raise NotImplementedError

    def decode(self, latents: Latents) -> Tensor:
        """Latents -> [n, d] reconstruction."""
        if latents.is_sparse:
            return sparse_decode(latents.values, latents.indices, self.W_dec, latents.offsets) + self.b_dec
        return latents.dense.to(self.dtype) @ self.W_dec + self.b_dec

    def decode_dense(self, latents: Tensor) -> Tensor:
        """Dense latents [n, m] -> [n, d] reconstruction."""
        return latents.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x [..., d] with the inference-time activation."""
        self.check_width(x)
        shape = x.shape
        flat = x.reshape(-1, self.d_in)
        return self.decode(self.encode(flat)).reshape(shape)

    def encode_dense(self, x: Tensor) -> Tensor:
        """[n, d] -> [n, m] dense latent activations."""
        return self.encode(x).to_dense()

    def train_step(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        """One training forward pass on x [n, d] (already normalised): reconstruction and losses."""
        raise NotImplementedError

    # ---------------------------------------------------------------------- shared pieces
    def _mse(self, x: Tensor, recon: Tensor) -> Tensor:
        """Squared error summed over dimensions, averaged over tokens."""
        # one fused op forward and backward instead of sub, pow, sum and mean over [n, d]
        return F.mse_loss(recon, x.to(recon.dtype), reduction="sum") / x.shape[0]

    def _sparse_select(self, x: Tensor, x_c: Tensor, values: Tensor, rows: Tensor, cols: Tensor,
                       offsets: Tensor) -> Tensor:
        """ReLU of the pre-activations ``values`` picked at (rows, cols) (computed without a graph,
        x_c = x - b_dec likewise), with sparse gradients into the encoder and b_dec."""
        vals = gather_pre_acts(x, self.b_dec, self.encoder.weight, self.encoder.bias, rows, cols, offsets,
                               values, x_c=x_c)
        return F.relu(vals)

    def _sparse_train_output(self, x: Tensor, x_c: Tensor, pre: Tensor, rows: Tensor, cols: Tensor,
                             offsets: Tensor, ctx: TrainContext, values: Tensor | None = None) -> TrainOutput:
        """The shared tail of the selection-based SAEs (TopK, BatchTopK): decode the selected
        latents sparsely, score mse and AuxK, return the train-step contract.

        x_c = x - b_dec and pre [n, m] are the graph-free pre-activation inputs and outputs;
        ``values`` = pre[rows, cols] when the selection already has them (topk returns them)."""
        if values is None:
            values = pre[rows, cols]
        vals = self._sparse_select(x, x_c, values, rows, cols, offsets)
        recon = sparse_decode(vals, cols, self.W_dec, offsets, rows) + self.b_dec
        losses = {"mse": self._mse(x, recon)}
        if self.cfg.auxk_coefficient > 0:
            losses["auxk"] = self._auxk_loss(x, x_c, pre, recon, ctx.dead_mask)
        latents = Latents(self.num_latents, values=vals.detach(), indices=cols, offsets=offsets)
        return TrainOutput(recon=recon, latents=latents, losses=losses)

    def _auxk_loss(self, x: Tensor, x_c: Tensor, pre: Tensor, recon: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024, App. B.1): the k_aux most active dead latents reconstruct the
        residual x - x_hat of the live ones; weighted by ``auxk_coefficient``.

        Costs nothing when no latent is dead (the usual case once training is under way)."""
        zero = recon.new_zeros(())
        if self.cfg.auxk_coefficient <= 0 or dead_mask is None:
            return zero
        dead = dead_mask.nonzero().squeeze(1)
        num_dead = dead.numel()
        if num_dead == 0:
            return zero
        n, m = pre.shape
        k_aux = min(self.cfg.resolved_k_aux(self.d_in), num_dead)
        with torch.no_grad():
            if 2 * num_dead <= m:
                # Few dead latents: top-k over their columns only ([n, num_dead]), not over an
                # [n, m] copy with the live latents masked to -inf.
                values, local = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
                idx = dead[local]
            else:
                values, idx = pre.masked_fill(~dead_mask[None, :], float("-inf")).topk(k_aux, dim=-1, sorted=False)
        rows, offsets = row_layout(n, k_aux, pre.device)
        cols = idx.reshape(-1)
        vals = self._sparse_select(x, x_c, values.reshape(-1), rows, cols, offsets)
        e_hat = sparse_decode(vals, cols, self.W_dec, offsets, rows)
        residual = (x - recon).detach()
        return self.cfg.auxk_coefficient * F.mse_loss(e_hat, residual, reduction="sum") / n

    # --------------------------------------------------------------- decoder constraints
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project each decoder row's gradient onto the row's orthogonal complement, so a step does
        not fight the unit-norm constraint (Bricken et al. 2023)."""
        if self.W_dec.grad is None:
            return
        grad, w = self.W_dec.grad, self.W_dec.data
        parallel = einops.einsum(grad, w, "m d, m d -> m")
        grad -= einops.einsum(parallel, w, "m, m d -> m d") / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)

    def before_optimizer_step(self) -> None:
        if self.cfg.normalize_decoder:
            self.remove_gradient_parallel_to_decoder_directions()

    def after_optimizer_step(self) -> None:
        if self.cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()

    def calibrate(self, x: Tensor, batch_size: int) -> None:
        """After training: set inference-time statistics from normalised inputs x [n, d] (BatchTopK's
        threshold); a no-op for most architectures."""

    # ------------------------------------------------------------------- normaliser folding
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Turn an SAE trained on ``scale * x`` into one that takes raw x.

        W_enc (x - b_dec/s) + b_enc/s = (W_enc (s x - b_dec) + b_enc) / s, so dividing both biases
        (and any threshold) by s gives latents scaled by 1/s, and W_dec f/s + b_dec/s = x_hat/s: the
        decoder keeps unit-norm rows and the latents are in raw units.
        """
        self.b_dec.div_(scale)
        self.encoder.bias.div_(scale)
        self._fold_thresholds(scale)

    def _fold_thresholds(self, scale: float) -> None:
        """Architectures with thresholds divide them by ``scale``."""

    # ----------------------------------------------------------------------------- files
    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def save_pretrained(self, path: str | Path, *, sparsity: Tensor | None = None, extra: dict | None = None,
                        layout: str = "sparsify") -> Path:
        """Write the SAE into folder ``path``.

        layout ``sparsify`` (default): ``sae.safetensors`` + ``cfg.json`` (+ ``sparsity.safetensors``:
        log10 feature density, SAELens' name), EleutherAI sparsify's layout with our placement
        fields added; ``saelens``: SAELens' ``sae_weights.safetensors`` + ``cfg.json`` with the hook
        metadata, which ``sae_lens.SAE.load_from_disk`` opens. ``extra`` is merged into cfg.json.
        """
        if layout == "saelens":
            return saelens.save_saelens(self, path, sparsity=sparsity)
        if layout != "sparsify":
            raise UsageError(f"unknown SAE file layout {layout!r}; valid: sparsify, saelens")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        cfg = self.cfg.to_dict(self.d_in)
        cfg.update(self.placement.to_dict())
        if extra:
            cfg.update(extra)
        (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if sparsity is not None:
            save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(path / SPARSITY_FILE))
        return path

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, *, site: str | None = None, window=None, branch: str | None = None,
        device: str | torch.device = "cpu", revision: str | None = None,
    ) -> "SparseCoder":
        """Load an SAE and where it belongs (``sae.placement``: site, stage, window, branch, model).

        ``path_or_hub_id``: a folder holding cfg.json, a folder of several SAEs (pick one by ``site``,
        ``window`` and ``branch``, as saved in their cfg.json), or a hub repo id. The class is chosen by
        cfg.json's ``architecture`` (sparsify's files name none: their ``activation: topk`` says
        it). A folder in SAELens' layout (``sae_weights.safetensors``, as ``save_pretrained(...,
        layout="saelens")`` writes it) loads too. A file that is missing, truncated, not JSON,
        lacks a field or disagrees with the other is a UsageError (FileNotFoundError) naming it.
        """
        folder = find_sae_folder(_local_folder(path_or_hub_id, site, revision), site=site, window=window, branch=branch)
        cfg_path = folder / CONFIG_FILE
        data = read_sae_config(cfg_path)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file() and (folder / saelens.WEIGHTS_FILE).is_file():  # SAELens' layout
            weights = folder / saelens.WEIGHTS_FILE
            data, tensors = saelens.to_sparsify(cfg_path, data, read_weights(weights, device), weights)
        else:
            tensors = read_weights(weights, device)
        cfg, d_in = SparseCoderConfig.from_dict(data, source=str(cfg_path))
        placement = Placement.from_dict(data, source=str(cfg_path))
        W_dec = tensors.get("W_dec")
        if W_dec is None or W_dec.ndim != 2:
            raise UsageError(f"{weights} holds no 2-D W_dec: not an SAE in the sparsify layout "
                             f"(tensors: {', '.join(sorted(tensors))})")
        rows, width = (int(n) for n in W_dec.shape)
        if width != d_in:
            raise UsageError(f"{cfg_path} says d_in={d_in} but the weights in {weights} "
                             f"take width {width}; the files do not belong together")
        if rows != cfg.resolved_num_latents(d_in):
            raise UsageError(f"{cfg_path} says num_latents={cfg.resolved_num_latents(d_in)} but the weights in {weights} "
                             f"have {rows} latents; the files do not belong together")
        try:
            arch = get_architecture(cfg.architecture)
        except ValueError as err:
            raise UsageError(f"{cfg_path}: {err}") from None
        if cls is not SparseCoder and not issubclass(arch, cls):
            raise TypeError(f"{folder} holds a {cfg.architecture!r} SAE, not a {cls.__name__}")
        sae = arch(cfg, d_in, device=device, dtype=W_dec.dtype)
        try:
            missing, unexpected = sae.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            raise UsageError(f"{weights} does not match the {cfg.architecture!r} SAE of {cfg_path} "
                             f"(d_in={d_in}, num_latents={rows}): {' '.join(str(err).split())}") from None
        if missing or unexpected:
            raise UsageError(f"{weights} does not match a {cfg.architecture!r} SAE: "
                             f"missing {missing}, unexpected {unexpected}")
        sae.placement = placement
        sae.source = folder  # recipes refer to a loaded SAE by its folder
        return sae

    def check_model(self, revision: str | None, what: str) -> None:
        """Refuse ``what`` (a model, or a store harvested from one) whose U-Net weights fingerprint
        (``activations.pipeline.model_fingerprint``) is ``revision`` when this SAE was trained on
        other weights. A side that records no fingerprint is no evidence against the other."""
        mine = self.placement.model_revision
        if mine is not None and revision is not None and mine != revision:
            where = f" ({self.source})" if self.source is not None else ""
            raise UsageError(f"this SAE{where} was trained on model {self.placement.model!r} (weights {mine}) but "
                             f"{what} has weights {revision}; use an SAE trained on this model")

    def splice(self, *, error_term: bool = True, site: str | None = None, **gate):
        """An Intervention that runs this SAE at its site during generation.

        ``error_term=True``: the site's value becomes x̂' + (x − x̂), the (possibly edited)
        reconstruction plus the SAE's error, so that editing one latent changes only that latent's
        contribution (SAELens' ``use_error_term``); ``False``: the reconstruction alone. ``gate``:
        ``when``, ``branch``, ``mask`` as for any intervention.
        """
        from activations.intervention import intervention_class

        # looked up by name (sae.splice registers it): that module imports this one
        return intervention_class("sae_splice")(sae=self, site=site or self.placement.site, error_term=error_term, **gate)

    def push_to_hub(self, repo_id: str, *, site: str | None = None, private: bool = False,
                    commit_message: str = "Upload SAE", sparsity: Tensor | None = None) -> str:
        """Upload the files (into folder ``site`` of the repo when given). Returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, sparsity=sparsity)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=site or self.placement.site or "",
                                     commit_message=commit_message)
        return str(info)


def _local_folder(path_or_hub_id: str | Path, site: str | None, revision: str | None) -> Path:
    """A local folder for a path or a hub repo id (downloaded when the hub can be reached)."""
    folder = Path(path_or_hub_id).expanduser()
    if folder.exists():
        return folder
    name = str(path_or_hub_id)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"SAE folder {str(folder)!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=f"{site}/*" if site else None))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: one clear message
        raise FileNotFoundError(f"SAE {name!r} is neither a local folder nor a reachable hub repo ({type(err).__name__}: "
                                f"{err}); pass a local folder") from None


def read_sae_config(path: Path) -> dict:
    """An SAE's cfg.json as a dict; a UsageError naming the file when it is not a JSON object."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); an SAE's {CONFIG_FILE} is a JSON object") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an SAE config (a JSON object with "
                         "architecture, d_in, num_latents, ...)")
    return data


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file; a missing, truncated or foreign file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an SAE folder holds {WEIGHTS_FILE} (or SAELens' "
                                f"sae_weights.safetensors) beside {CONFIG_FILE}")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise UsageError(f"{path} cannot be read ({err}): it is truncated or not a safetensors file; "
                         "copy or save the SAE again") from None


def find_sae_folder(folder: Path, *, site: str | None = None, window=None, branch: str | None = None) -> Path:
    """The folder of one SAE: ``folder`` itself when it holds cfg.json, else the one subfolder whose
    cfg.json matches ``site``, ``window`` and ``branch`` (a folder of several SAEs, e.g. a grid
    trained in one run: one per site, window and branch)."""
    from activations.timesteps import parse_when

    if (folder / CONFIG_FILE).exists() and site is None and window is None and branch is None:
        return folder
    candidates = [folder] if (folder / CONFIG_FILE).exists() else sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).exists())
    if not candidates:
        raise FileNotFoundError(f"no SAE in {folder}: no {CONFIG_FILE} there or in its subfolders")
    want_window = parse_when(window) if window is not None else None
    placed = []  # (folder, site, window, branch) of every SAE here
    for c in candidates:
        data = read_sae_config(c / CONFIG_FILE)
        placed.append((c, data.get("site") or (c.name.split("__")[0] if c != folder else None), data.get("window"),
                       data.get("branch")))
    available = "; ".join(f"{c.name}: site={s!r}, window={w!r}, branch={b!r}" for c, s, w, b in placed)
    if site is None and window is None and branch is None:
        raise FileNotFoundError(f"{folder} holds a folder of SAEs; pick one by site (and window, branch): {available}")
    found = [p for p in placed if (site is None or p[1] == site) and (branch is None or p[3] == branch)
             and (want_window is None or parse_when(p[2]) == want_window)]
    if len(found) == 1:
        return found[0][0]
    what = f"site={site!r}, window={window!r}, branch={branch!r}"
    if not found:
        raise FileNotFoundError(f"no SAE with {what} in {folder}; available: {available}")
    raise FileNotFoundError(f"several SAEs match {what} in {folder}; pick one by site, window and branch: {available}")


SAE = SparseCoder
