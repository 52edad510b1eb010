"""Official models by name, fetched through the Hugging Face Hub: `VARPipeline.from_pretrained("var-d30")`,
`var-rt generate --model code-8 ...`, `var-rt download var-d30 code-8`, `var-rt models`.

MODELS maps a name to its files (Hub repo + file name per role: var / drafter / refiner / vae for VAR and CoDe,
gpt / vq for LlamaGen). `resolve` fetches them with `huggingface_hub.hf_hub_download`: the Hub's cache (HF_HOME,
HF_HUB_CACHE or cache_dir), resumable downloads, progress bars, HF_HUB_OFFLINE=1 and revision pinning are
huggingface_hub's. A file that is not cached while downloads are off is one line naming the file, its repo and the
command that fetches it (`var-rt download NAME`); the files are then checked and loaded by the strict loader
(`from_checkpoints`), and a damaged cached file is reported by it with the hint to refetch (`--force`).

The file names were checked against the official READMEs (FoundationVision/VAR, czg1225/CoDe,
FoundationVision/LlamaGen). FID figures are the papers' / READMEs' (50k ImageNet samples), not measured here;
sizes are approximate (parameter counts x 4 bytes, the files being fp32), not measured either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

VAR_REPO = "FoundationVision/var"
CODE_REPO = "Zigeng/VAR_CoDe"
LLAMAGEN_REPO = "FoundationVision/LlamaGen"
VAE_FILE = "vae_ch160v4096z32.pth"
VQ_FILE = "vq_ds16_c2i.pt"
# the loaders' family of each role (var_rt.loaders.FAMILY)
ROLE_FAMILY = {"var": "var", "drafter": "var", "refiner": "var", "vae": "vqvae", "gpt": "llamagen", "vq": "vq16"}


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    approx_bytes: int | None = None   # approximate (params x 4 bytes); None: unknown

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str                      # "var" (VAR and CoDe) | "llamagen"
    files: dict                      # role -> HubFile, in fetch order
    image_size: int
    draft_steps: int | None = None   # CoDe: the scales the drafter runs
    preset: str | None = None        # the sampling preset the CLI uses unless sampling options are given
    paper: str = ""                  # the paper's / README's figure
    params: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def repo(self) -> str:
        """The repo of the model's own weights (the one `revision` pins)."""
        return next(iter(self.files.values())).repo


def _gb(params_billion: float) -> int:
    return int(params_billion * 4e9)


_VAE = HubFile(VAR_REPO, VAE_FILE, _gb(0.109))
_VQ = HubFile(LLAMAGEN_REPO, VQ_FILE, _gb(0.072))
# VAR paper (Tian et al. 2024), ImageNet 256x256 (d36: 512x512) class-conditional FID
_VAR = {16: ("310M", 0.31, 3.55, 256), 20: ("600M", 0.60, 2.95, 256), 24: ("1.0B", 1.0, 2.33, 256),
        30: ("2.0B", 2.0, 1.97, 256), 36: ("2.3B", 2.3, 2.63, 512)}
# CoDe paper (Chen et al. 2024), ImageNet 256x256, fine-tuned drafter (d30) / refiner (d16)
_CODE_FID = {6: 2.27, 7: 2.11, 8: 1.98, 9: 1.94}
# LlamaGen README (Sun et al. 2024): (params, GB fp32, FID at 256x256); only the files the README lists
_LLAMAGEN = {("B", 256): ("111M", 0.111, 5.46), ("B", 384): ("111M", 0.111, 6.09),
             ("L", 256): ("343M", 0.343, 3.80), ("L", 384): ("343M", 0.343, 3.07),
             ("XL", 384): ("775M", 0.775, 2.62), ("XXL", 384): ("1.4B", 1.4, 2.34), ("3B", 384): ("3.1B", 3.1, 2.18)}


def _build() -> dict:
    m = {}
    for d, (params, gb, fid, px) in _VAR.items():
        m[f"var-d{d}"] = ModelEntry(f"var-d{d}", "var", {"var": HubFile(VAR_REPO, f"var_d{d}.pth", _gb(gb)),
                                                           "vae": _VAE}, px,
                                    paper=f"FID {fid} ({px}px, VAR paper)", params=params)
    for n, fid in _CODE_FID.items():
        m[f"code-{n}"] = ModelEntry(
            f"code-{n}", "var", {"drafter": HubFile(CODE_REPO, f"drafter_{n}.pth", _gb(2.0)),
                                 "refiner": HubFile(CODE_REPO, f"refiner_{n}.pth", _gb(0.31)), "vae": _VAE},
            256, draft_steps=n, preset="code-eval", paper=f"FID {fid} (256px, CoDe paper, N={n})",
            params="2.0B + 310M", note=f"fine-tuned CoDe, N={n}")
    for n in range(1, 10):
        m[f"code-free-{n}"] = ModelEntry(
            f"code-free-{n}", "var", {"drafter": HubFile(VAR_REPO, "var_d30.pth", _gb(2.0)),
                                      "refiner": HubFile(VAR_REPO, "var_d16.pth", _gb(0.31)), "vae": _VAE},
            256, draft_steps=n, preset="code-eval", params="2.0B + 310M",
            note=f"training-free CoDe: var_d30 drafter + var_d16 refiner, N={n}")
    for (size, px), (params, gb, fid) in _LLAMAGEN.items():
        name = f"llamagen-{size.lower()}-{px}"
        m[name] = ModelEntry(name, "llamagen", {"gpt": HubFile(LLAMAGEN_REPO, f"c2i_{size}_{px}.pt", _gb(gb)),
                                                "vq": _VQ}, px,
                             paper=f"FID {fid} (LlamaGen README, {px}px model scored at 256px)", params=params)
    return m


MODELS: dict[str, ModelEntry] = _build()


class HubFileMissing(FileNotFoundError):
    """A file of a named model that is not in the cache while downloads are off (one line)."""


def names(family: str | None = None) -> list:
    return [n for n, e in MODELS.items() if family is None or e.family == family]


def entry(name: str, family: str | None = None) -> ModelEntry:
    """The ModelEntry of `name`; ValueError listing the known names (of `family` when given)."""
    key = str(name).strip().lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known names: {', '.join(names(family))} (var-rt models lists "
                         "them with their files)")
    e = MODELS[key]
    if family is not None and e.family != family:
        cls = "VARPipeline" if family == "var" else "LlamaGenPipeline"
        other = "LlamaGenPipeline" if family == "var" else "VARPipeline"
        raise ValueError(f"{e.name} is a {'LlamaGen' if e.family == 'llamagen' else 'VAR'} model: load it with "
                         f"{other}.from_pretrained; {cls} takes {', '.join(names(family))}")
    return e


def _offline() -> bool:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE, read when it is imported)."""
    try:
        from huggingface_hub import constants
        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(name, family: str | None = None, revision=None, cache_dir=None, local_files_only=None,
            force_download=False, local_dir=None) -> dict:
    """{role: local path} of the named model's files, fetched through huggingface_hub.hf_hub_download (cached,
    resumable). revision pins the repo of the model's own weights (ModelEntry.repo); a shared file of another
    repo (the VAR VQVAE of the CoDe names) comes from its main branch. local_files_only None: huggingface_hub's
    default (HF_HUB_OFFLINE). local_dir: copies the files into that folder (var-rt download --dir)."""
    e = entry(name, family)
    try:
        from huggingface_hub import hf_hub_download
        try:
            from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                                RepositoryNotFoundError, RevisionNotFoundError)
        except ImportError:  # huggingface_hub < 0.24
            from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                               RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as err:
        raise ImportError(f"model names need huggingface_hub (pip install huggingface_hub): {err}") from None
    import var_rt
    if force_download and (_offline() or local_files_only):
        raise OSError(f"model {e.name}: cannot download again (force) while downloads are off "
                      f"({'HF_HUB_OFFLINE=1' if _offline() else 'local_files_only'})")
    paths = {}
    for role, f in e.files.items():
        kw = dict(revision=revision if f.repo == e.repo else None, cache_dir=cache_dir, force_download=force_download,
                  library_name="var_rt", library_version=var_rt.__version__)
        if local_files_only is not None:
            kw["local_files_only"] = bool(local_files_only)
        if local_dir is not None:
            kw["local_dir"] = os.fspath(local_dir)
        where = f"{f.filename} of {f.repo}" + (f" at revision {kw['revision']}" if kw["revision"] else "")
        try:
            paths[role] = hf_hub_download(f.repo, f.filename, **kw)
        except LocalEntryNotFoundError:
            why = ("downloads are off (HF_HUB_OFFLINE=1)" if _offline() and not local_files_only else
                   "local_files_only is set" if local_files_only else "the Hub could not be reached")
            if force_download:
                raise HubFileMissing(f"model {e.name}: cannot download {where} again: {why}") from None
            raise HubFileMissing(f"model {e.name}: {where} is not in the Hugging Face cache and {why}; fetch it "
                                 f"with `var-rt download {e.name}` on a machine with internet") from None
        except RevisionNotFoundError:
            raise OSError(f"model {e.name}: revision {revision!r} not found in {f.repo}") from None
        except EntryNotFoundError:
            raise OSError(f"model {e.name}: {where} not found on the Hub") from None
        except RepositoryNotFoundError:
            raise OSError(f"model {e.name}: repository {f.repo} not found on the Hub (or not accessible)") from None
        except HfHubHTTPError as err:
            raise OSError(f"model {e.name}: cannot fetch {where}: {' '.join(str(err).split())[:300]}") from None
    return paths


def damaged_hint(e: ModelEntry) -> str:
    return (f" (a damaged or incomplete file in the Hugging Face cache? refetch it with "
            f"`var-rt download {e.name} --force`)")


def check_files(e: ModelEntry, paths: dict) -> None:
    """Every file through the strict loader's check (var_rt.loaders.inspect) without loading it; a bad file is
    its CheckpointError with the hint to refetch."""
    from var_rt import checkpoint, loaders
    for role, p in paths.items():
        try:
            loaders.inspect(p, ROLE_FAMILY[role], role)
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(str(err) + damaged_hint(e)) from None


def rows() -> list:
    """The table of `var-rt models`: (name, image size, repos and files, approx. size, paper figure, note)."""
    out = []
    for e in MODELS.values():
        files = ", ".join(f"{f.repo}/{f.filename}" for f in e.files.values())
        total = sum(f.approx_bytes or 0 for f in e.files.values())
        steps = f" N={e.draft_steps}" if e.draft_steps else ""
        out.append((e.name, f"{e.image_size}px{steps}", files, f"~{total / 1e9:.1f} GB", e.paper or "-",
                    e.note))
    return out


def from_pretrained(cls, family: str, name, device="cpu", dtype=None, revision=None, cache_dir=None,
                    local_files_only=None, backend=None, **kw):
    """The pipelines' from_pretrained: the arguments checked, the files resolved (resolve), then the strict loader
    (cls.from_checkpoints); a damaged cached file is its CheckpointError with the hint to refetch. kw: draft_steps
    (VAR: CoDe names only; default the name's N), image_size (LlamaGen)."""
    from var_rt import checkpoint, ops
    from var_rt.pipeline_base import check_device, resolve_dtype
    e = entry(name, family)
    check_device(device)
    resolve_dtype(dtype, device)
    ops.resolve_backend(backend, device)
    if family == "var":
        steps = kw.pop("draft_steps", None)
        if steps is not None and e.draft_steps is None:
            raise ValueError(f"draft_steps={steps!r} is for the CoDe names (code-N, code-free-N), not {e.name}")
        kw["draft_steps"] = steps if steps is not None else e.draft_steps
    paths = resolve(e.name, family, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        if family == "llamagen":
            pipe = cls.from_checkpoints(gpt=paths["gpt"], vq=paths["vq"], device=device, dtype=dtype, backend=backend,
                                        **kw)
        elif "var" in paths:
            pipe = cls.from_checkpoints(var=paths["var"], vae=paths["vae"], device=device, dtype=dtype,
                                        backend=backend)
        else:
            pipe = cls.from_checkpoints(drafter=paths["drafter"], refiner=paths["refiner"], vae=paths["vae"],
                                        device=device, dtype=dtype, backend=backend, **kw)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(str(err) + damaged_hint(e)) from None
    pipe.hub_model = e   # the name's entry: files, paper figure, sampling preset (pipe(labels, preset=e.preset))
    return pipe
