"""The generation-time logic of the script, free of gradio: read the panel and the prompt tags,
write the infotext, and wrap ``p.sample`` so that hooks exist only while it runs.

A1111 swallows (logs) exceptions raised in a script's ``process``/``process_batch``, which would
let a generation run silently without erasure. Everything that can fail therefore runs inside
the ``p.sample`` wrapper, whose exceptions reach the UI as an error message, and whose
``finally`` removes every hook also on error or interrupt. ``p.sample`` is where the host runs
the UNet (first pass and, for txt2img, the hires pass: A1111 1.10 / Forge
``StableDiffusionProcessingTxt2Img.sample`` loads the hires checkpoint, if any, then calls
``self.sample_hr_pass``, which is wrapped too).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

from unhype import infotext
from unhype.dynamic_lora import check_strength
from unhype.errors import UnHypeError
from unhype.model_check import checkpoint_family
from unhype.prompt_tags import find_tags, rename_tags

from unhype_webui import files, host
from unhype_webui.session import (MISMATCH_STOP, Active, Schedule, Session, build_session,
                                  fit_problems)

log = logging.getLogger("unhype")
_live: "weakref.WeakSet[Session]" = weakref.WeakSet()


def remove_all() -> int:
    """Take off hooks of any session still attached (safety net; returns how many)."""
    n = 0
    for session in list(_live):
        if session.attached:
            session.remove()
            n += 1
    return n


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _flag(value, what: str, default: bool) -> bool:
    """A checkbox value as the UI sends it, or as an API caller may (0/1, "false"): strict,
    since bool("false") is True."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise UnHypeError(f"UnHype: script argument '{what}' must be true or false, got {value!r}")


@dataclass
class PanelArgs:
    enabled: bool = False
    name: str | None = None
    strength: float = 1.0
    cond_only: bool = True
    problem: str | None = None  # an argument that cannot be read: the generation stops

    @classmethod
    def from_args(cls, args) -> "PanelArgs":
        args = list(args) + [None] * 4
        enabled, name, strength, cond_only = args[:4]
        try:
            if name is not None and not isinstance(name, str):
                raise UnHypeError(f"UnHype: script argument 'hypernetwork' must be a name, "
                                  f"got {name!r}")
            return cls(_flag(enabled, "enabled", False), name or None,
                       1.0 if strength is None else strength,
                       _flag(cond_only, "cond only", True))
        except UnHypeError as exc:
            return cls(problem=str(exc))


@dataclass
class RunState:
    panel: PanelArgs
    panel_entry: tuple | None = None  # (name, path, hash)
    error: str | None = None
    sessions: list = field(default_factory=list)
    original_sample: object = None
    prompts: list | None = None  # p.sample's prompts (this batch), for a session built again
    sampling: bool = False  # inside p.sample: a setup_conds call is the refiner switch
    hires_switch: str | None = None  # set while the hires pass waits for its conds (a label)
    hires_pending: bool = False
    hires_early: list = field(default_factory=list)  # the session built before the hires conds
    tag_files: set = field(default_factory=set)  # (name, hash) of every tag used, both passes


def batch_slice(p, values):
    if not values:
        return []
    n, bs = getattr(p, "iteration", 0), getattr(p, "batch_size", 1) or 1
    return list(values[n * bs:(n + 1) * bs])


def process(p, *args) -> RunState:
    """Script.process: read the panel, record the infotext, install the sample wrapper."""
    remove_all()
    state = RunState(PanelArgs.from_args(args))
    panel = state.panel
    if panel.problem:
        state.error = panel.problem
    elif panel.enabled and panel.name:
        try:
            strength = check_strength(panel.strength)
            name, path = files.resolve(panel.name)
            file_hash = infotext.short_hash(path)
            state.panel_entry = (name, path, file_hash)
            p.extra_generation_params.update(
                infotext.format_fields(name, file_hash, strength, panel.cond_only))
        except UnHypeError as exc:
            state.error = str(exc)
        except Exception as exc:  # noqa: BLE001  the web UI only logs what process raises
            # (scripts.py L840-846) and would generate without UnHype; the sample wrapper,
            # installed below, stops the generation with this instead
            state.error = f"UnHype: {panel.name}: {type(exc).__name__}: {exc}"
    elif panel.enabled:
        state.error = "UnHype is enabled but no hypernetwork is selected"
    p.unhype_state = state
    install_sample_wrapper(p)
    return state


def tag_actives(p, cond_only: bool, hires: bool = False) -> list[Active]:
    """One Active per distinct (file, strength) in the batch's prompts of one pass (the first
    pass's, or with `hires` the hires prompts': the web UI activates each pass's own extra
    networks, processing.py L952-955 / L1512-1514), with the items that carry it."""
    prompts = batch_slice(p, getattr(p, "all_hr_prompts" if hires else "all_prompts", None))
    found: dict[tuple, Active] = {}
    default = host.default_tag_strength()
    for item, prompt in enumerate(prompts):
        for tag in find_tags(prompt, default):
            name, path = files.resolve(tag.name)
            key = (path, tag.strength)
            if key not in found:
                found[key] = Active(name, infotext.short_hash(path), files.load(path),
                                    tag.strength, cond_only, set())
            found[key].items.add(item)
    return list(found.values())


def first_pass_schedule(p) -> Schedule:
    """As setup_conds schedules the first pass: over the sampler's total steps (processing.py
    L494-496; ``p.firstpass_steps`` once it has run)."""
    steps = getattr(p, "firstpass_steps", None) or host.total_steps(
        getattr(p, "sampler_name", None), int(getattr(p, "steps", 20) or 20))
    return Schedule(int(steps), None, bool(host.option("use_old_scheduling", False)))


def hires_schedule(p) -> Schedule:
    """As calculate_hr_conds schedules the hires pass (L1584-1592): the first pass's total
    steps and its own, so a ``when`` between 1 and 2 falls in the hires pass."""
    first = first_pass_schedule(p)
    steps = int(getattr(p, "hr_second_pass_steps", 0) or 0) or int(getattr(p, "steps", 20) or 20)
    sampler = getattr(p, "hr_sampler_name", None) or getattr(p, "sampler_name", None)
    return Schedule(first.steps, host.total_steps(sampler, steps), first.old)


def item_prompts(p, prompts, hires_only: bool = False) -> list[list[tuple[str, Schedule]]]:
    """(prompt, schedule) of each batch item's conditioning in one pass: the first pass's
    prompts, or with `hires_only` the hires prompts (scheduled as the hires pass is)."""
    if hires_only:
        schedule = hires_schedule(p)
        return [[(x, schedule)] for x in (getattr(p, "hr_prompts", None) or [])]
    schedule = first_pass_schedule(p)
    prompts = list(prompts if prompts is not None else getattr(p, "prompts", []))
    return [[(x, schedule)] for x in prompts]


def prepare(p, prompts=None, hires_only: bool = False, switch: str | None = None
            ) -> Session | None:
    """The session for the model current now: the first pass's (its prompts and the hires
    prompts), or with hires_only the hires pass's. `switch` names the checkpoint the web UI
    switched to (hires or refiner checkpoint), added to any error or note."""
    state: RunState = p.unhype_state
    if state.error:
        raise UnHypeError(state.error)
    actives = []
    if state.panel_entry:
        name, path, file_hash = state.panel_entry
        actives.append(Active(name, file_hash, files.load(path),
                              check_strength(state.panel.strength), state.panel.cond_only))
    tags = tag_actives(p, state.panel.cond_only, hires_only)
    if tags:  # the first pass's and the hires pass's tags alike
        state.tag_files |= {(a.name, a.file_hash) for a in tags}
        p.extra_generation_params[infotext.FIELD_HASHES] = infotext.format_hashes(
            sorted(state.tag_files))
    batch = item_prompts(p, prompts, hires_only)
    if state.panel_entry and tags:  # the panel's file also tagged: the tag's strength there
        tagged = set().union(*(a.items for a in tags if a.file_hash == actives[0].file_hash))
        if tagged:
            actives[0].items = set(range(len(batch))) - tagged
    actives += tags
    if not actives:
        return None
    where = f" [{switch}]" if switch else ""
    try:
        session = build_session(p.sd_model, actives, batch,
                                host.option("unhype_on_family_mismatch", MISMATCH_STOP))
    except UnHypeError as exc:
        raise UnHypeError(f"{exc}{where}") from None
    session.warnings = [f"{w}{where}" for w in session.warnings]
    for warning in session.warnings:
        if hasattr(p, "comment"):
            p.comment(warning)
    panel = actives[0] if state.panel_entry else None
    if panel is not None and not hires_only and switch is None and panel.strength != 0 and \
            not any(a is panel for a in session.actives):
        # "Generate without UnHype" dropped the panel's file: the image's parameters must not
        # say it was applied (the warning goes to the comments, which infotext leaves out)
        for key in (infotext.FIELD_NAME, infotext.FIELD_STRENGTH, infotext.FIELD_COND_ONLY):
            p.extra_generation_params.pop(key, None)
    return session


def _named_checkpoint(value) -> str | None:
    return str(value) if value and str(value) not in ("None", "Use same checkpoint") else None


def hires_checkpoint(p) -> str | None:
    """The hires pass's own checkpoint, when it has one (A1111 1.10 / Forge hr_checkpoint_name)."""
    return _named_checkpoint(getattr(p, "hr_checkpoint_name", None))


def upcoming_switches(p) -> list[tuple[str, str]]:
    """(label, file) of the checkpoints this generation will switch to, as the web UI knows
    them before sampling (A1111 1.10 / Forge: ``p.refiner_checkpoint_info``, set before the
    scripts' process; ``p.hr_checkpoint_info``, set in ``p.init``)."""
    out = []
    for label, name, info in (
            ("refiner checkpoint", _named_checkpoint(getattr(p, "refiner_checkpoint", None)),
             getattr(p, "refiner_checkpoint_info", None)),
            ("hires checkpoint", hires_checkpoint(p) if getattr(p, "enable_hr", False) else None,
             getattr(p, "hr_checkpoint_info", None))):
        if name and getattr(info, "filename", None):
            out.append((f"{label} {name}", info.filename))
    return out


def check_switches(p, session: Session | None) -> None:
    """Apply the family rule to the checkpoints the generation will switch to before its first
    step, from their safetensors headers, so a file that cannot fit one stops the generation
    now rather than at the switch (which checks again, on the loaded model)."""
    if session is None or not session.actives:
        return
    on_mismatch = host.option("unhype_on_family_mismatch", MISMATCH_STOP)
    for label, filename in upcoming_switches(p):
        family = checkpoint_family(filename)
        if family is not None:
            for warning in fit_problems(session.actives, family, on_mismatch, f" [{label}]"):
                if hasattr(p, "comment"):
                    p.comment(warning)


def use_session(p, session: Session | None) -> None:
    """Take every hook of this generation off, then attach `session` (None: run without). A
    session that fails to build raises before this; p.sample's finally takes the old hooks off."""
    for old in p.unhype_state.sessions:
        old.remove()
    if session is None or not session.actives:
        return
    _live.add(session)
    p.unhype_state.sessions.append(session)
    session.attach()


def install_sample_wrapper(p) -> None:
    """``p.sample`` runs with the first pass's session attached and takes every hook off in its
    ``finally``. Inside it the web UI can switch checkpoints, and the session follows the
    model, built on the new one (its UNet, its text encoder's embeddings and conditioning):

    * hires pass: ``p.sample_hr_pass`` is wrapped; its session is built once the web UI has
      made the hires conds (``p.calculate_hr_conds``, also wrapped), which it does after
      activating the hires prompt's extra networks: a text-encoder LoRA there changes the
      conds the session must recognise (processing.py L1501-1506). A hires checkpoint is
      loaded before ``sample_hr_pass``;
    * refiner: ``sd_samplers_common.apply_refiner`` loads it mid-sampling and calls
      ``p.setup_conds()``, which is wrapped (a call while sampling is that switch).

    The new model can be a new UNet or new weights in the same modules; either way the session
    is built again."""
    if getattr(p.sample, "_unhype_wrapper", False):
        return
    state: RunState = p.unhype_state
    original = p.sample
    original_hr = getattr(p, "sample_hr_pass", None)
    original_setup = getattr(p, "setup_conds", None)
    original_hr_conds = getattr(p, "calculate_hr_conds", None)

    def sample(*args, **kwargs):
        state.prompts = kwargs.get("prompts")
        state.sampling = True
        try:
            session = prepare(p, state.prompts)
            check_switches(p, session)
            use_session(p, session)
            return original(*args, **kwargs)
        finally:
            state.sampling = False
            use_session(p, None)

    def sample_hr_pass(*args, **kwargs):
        # the hires pass gets its own session: its prompts, their schedule and their tags, on
        # the model current now (a hires checkpoint; or Forge's reload of the same one for other
        # hires VAE / text encoder, processing.py L1402-1419, whose callback took the hooks off)
        name = hires_checkpoint(p)
        switch = f"hires checkpoint {name}" if name else None
        # built now, and again once the web UI has made the hires conds (calculate_hr_conds,
        # below): a web UI that makes them elsewhere still samples with this one
        before = len(state.sessions)
        use_session(p, prepare(p, hires_only=True, switch=switch))
        if original_hr_conds is None:
            return original_hr(*args, **kwargs)
        state.hires_switch, state.hires_pending = switch, True
        state.hires_early = state.sessions[before:]
        try:
            return original_hr(*args, **kwargs)
        finally:
            state.hires_pending = False

    def calculate_hr_conds(*args, **kwargs):
        out = original_hr_conds(*args, **kwargs)
        if state.hires_pending:  # in the hires pass, its extra networks active now
            state.hires_pending = False
            for early in state.hires_early:  # replaced: the conds it matched may have changed
                early.remove()
                state.sessions.remove(early)
            use_session(p, prepare(p, hires_only=True, switch=state.hires_switch))
        return out

    def setup_conds(*args, **kwargs):
        out = original_setup(*args, **kwargs)
        if state.sampling:  # apply_refiner: the refiner checkpoint is the current model now
            name = _named_checkpoint(getattr(p, "refiner_checkpoint", None)) or "refiner"
            use_session(p, prepare(p, state.prompts, getattr(p, "is_hr_pass", False),
                                   switch=f"refiner checkpoint {name}"))
        return out

    state.original_sample = original
    for name, wrapper, wrapped in (("sample", sample, original),
                                   ("sample_hr_pass", sample_hr_pass, original_hr),
                                   ("setup_conds", setup_conds, original_setup),
                                   ("calculate_hr_conds", calculate_hr_conds,
                                    original_hr_conds)):
        if wrapped is not None:
            wrapper._unhype_wrapper = True
            setattr(p, name, wrapper)


def postprocess(p) -> None:
    """Script.postprocess: drop the wrapper and any hook still on (should be none)."""
    state = getattr(p, "unhype_state", None)
    if state is not None:
        for session in state.sessions:
            session.remove()
        for name in ("sample", "sample_hr_pass", "setup_conds", "calculate_hr_conds"):
            if getattr(p.__dict__.get(name), "_unhype_wrapper", False):
                delattr(p, name)
    remove_all()


def paste_values(params: dict, choices: dict[str, str], warn: bool = False) -> dict:
    """Panel values from pasted infotext (PNG Info, "send to txt2img"); None = leave as is.

    The file is found by hash first (renamed files), then by name; an image made without
    UnHype turns the panel off.
    """
    try:
        entry = infotext.parse_fields(params)
    except UnHypeError as exc:
        log.warning("%s", exc)
        entry = None
    if entry is None:
        return {"enabled": False, "name": None, "strength": None, "cond_only": None}
    choice = infotext.find_file(choices, entry.name, entry.hash)
    if choice is None and warn:
        log.warning("UnHype: pasted hypernetwork %s [%s] is not in %s, or more than one file "
                    "has that name", entry.name, entry.hash, host.unhype_dir())
    if entry.problem and warn:  # the image was made with UnHype: the panel stays on, at the
        log.warning("UnHype: %s; the strength slider keeps its value", entry.problem)  # slider
    return {"enabled": choice is not None, "name": choice, "strength": entry.strength,
            "cond_only": entry.cond_only}


# The panel's components under names of their own: "Send to img2img" copies the components whose
# name is in the script's paste_field_names (strings only; infotext_utils.py L179-185), and a
# pasted infotext fills them from these keys, which `infotext_pasted` derives from the UnHype
# fields (script_callbacks.on_infotext_pasted runs before the fields are read, L583-584).
PASTE_FIELDS = {"enabled": "UnHype panel: enabled", "name": "UnHype panel: file",
                "strength": "UnHype panel: strength", "cond_only": "UnHype panel: cond only"}


def infotext_pasted(text: str, params: dict) -> None:
    """on_infotext_pasted: the panel's values from the pasted UnHype fields (None: left as
    is, so the key is not set)."""
    choices = files.list_files()
    values = paste_values(params, choices, warn=True)
    params.update({PASTE_FIELDS[k]: v for k, v in values.items() if v is not None})
    renamed = tag_renames(params, choices)
    for key in ("Prompt", "Hires prompt"):
        if renamed and isinstance(params.get(key), str):
            params[key] = rename_tags(params[key], renamed)


def tag_renames(params: dict, choices: dict[str, str]) -> dict[str, str]:
    """Tag name -> the name of the file with its recorded hash now (``UnHype hashes``), for the
    tags whose file was renamed or moved, as the built-in Lora does with ``Lora hashes``."""
    out = {}
    for name, file_hash in infotext.parse_hashes(params.get(infotext.FIELD_HASHES, "")).items():
        found = infotext.find_file(choices, "", file_hash)
        if found is not None and _resolves_to(name) != choices[found]:
            out[name] = found
    return out


def _resolves_to(name: str) -> str | None:
    try:
        return files.resolve(name)[1]
    except UnHypeError:
        return None

