"""modules/prompt_parser.py get_learned_conditioning_prompt_schedules (Forge L28-131, A1111
1.10 the same). The real one parses with lark; this stand-in knows one ``[a:b:when]`` per
prompt (parts may hold (emphasis:w) groups), which is what the tests use, and computes its
switch step as the real collect_steps does (L79-91): ``when`` with a decimal point is a
fraction of the steps, else a step number; for a hires pass (``hires_steps``, new scheduling)
both are offset by the first pass (1.0 / ``base_steps``) and counted in hires steps."""

import re

_PART = r"((?:\([^()]*\)|[^\[\]:()])*)"  # text, or a whole (emphasis:1.2) group
_EDIT = re.compile(r"\[" + _PART + ":" + _PART + r":\s*([0-9.]+)\s*\]")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None,
                                              use_old_scheduling=False):
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps
    out = []
    for prompt in prompts:
        m = _EDIT.search(prompt)
        if not m:
            out.append([[steps, prompt]])
            continue
        s = m[3]
        v = float(s)
        if use_old_scheduling:
            v = v * steps if v < 1 else v
        else:
            v = (v - flt_offset) * steps if "." in s else v - int_offset
        when = min(steps, int(v))
        before = prompt[:m.start()] + m[1] + prompt[m.end():]
        after = prompt[:m.start()] + m[2] + prompt[m.end():]
        ends = sorted({steps} | ({when} if when >= 1 else set()))
        out.append([[t, before if t <= when else after] for t in ends])
    return out
