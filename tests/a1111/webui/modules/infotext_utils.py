"""modules/infotext_utils.py: quote / unquote (Forge L58-71) and the key-value part of
parse_generation_parameters (re_param L18-19, L251-320: last line, unquote quoted values);
create_infotext's parameter line is processing.py L792."""

import json
import re

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)


def quote(text):
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def _generation_params_text(generation_params):
    """The parameter line processing.create_infotext joins inline (L792)."""
    return ", ".join([k if k == v else f'{k}: {quote(v)}'
                      for k, v in generation_params.items() if v is not None])


def parse_generation_parameters(x, skip_fields=None):
    res = {}
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    prompt, negative, done_with_prompt = [], [], False  # L283-296
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt, line = True, line[16:].strip()
        (negative if done_with_prompt else prompt).append(line)
    res["Prompt"], res["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            res[k] = v
        except Exception:
            pass
    for key in skip_fields or []:
        res.pop(key, None)
    return res
