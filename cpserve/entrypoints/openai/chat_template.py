"""`--chat-template`: a file holding a Jinja chat template, or the template itself (vLLM's rule).

A value that names no readable file is taken as the template when it looks like one (it has
a brace or a newline); otherwise it is a file path that failed, and start-up stops saying so.
The template is compiled once at start-up, so a syntax error is reported before serving.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cpserve.config import ConfigError

_TEMPLATE_CHARS = "{}\n"


def load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template {value!r}: cannot read it ({exc})") from None
    elif any(c in value for c in _TEMPLATE_CHARS):
        # Given on the command line: escapes such as \n mean what they say. (Escapes are
        # decoded from Latin-1, so text with other characters is taken as it is.)
        template = codecs.decode(value, "unicode_escape") if value.isascii() else value
    else:
        raise ConfigError(f"--chat-template {value!r} looks like a file path, but there is no "
                          "such file (a template given inline must contain '{' or a newline)")
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"--chat-template is not a valid Jinja template: {exc} (line "
                          f"{exc.lineno})") from None
    return template
