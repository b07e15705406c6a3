"""modules/prompt_parser.py get_learned_conditioning_prompt_schedules (Forge L28, A1111 1.10
same signature). The real one parses with lark; this stand-in knows ``[a:b:when]`` only
(when: a step number or a fraction of the steps; parts may hold (emphasis:w) groups),
which is what the tests use."""

import re

_PART = r"((?:\([^()]*\)|[^\[\]:()])*)"  # text, or a whole (emphasis:1.2) group
_EDIT = re.compile(r"\[" + _PART + ":" + _PART + r":\s*([0-9.]+)\s*\]")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None,
                                              use_old_scheduling=False):
    steps = hires_steps or base_steps
    out = []
    for prompt in prompts:
        m = _EDIT.search(prompt)
        if not m:
            out.append([[steps, prompt]])
            continue
        when = float(m[3])
        at = int(when * steps) if when < 1 else int(when)
        before = prompt[:m.start()] + m[1] + prompt[m.end():]
        after = prompt[:m.start()] + m[2] + prompt[m.end():]
        out.append([[at, before], [steps, after]])
    return out
