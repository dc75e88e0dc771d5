"""`perfxlm serve`'s flags: vLLM's names and defaults (the frontend's here, the engine's from
AsyncEngineArgs), and the checks vLLM runs on them before anything is loaded."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from perfxlm.engine.arg_utils import DEFAULT_MODEL, AsyncEngineArgs, json_dict_arg

logger = logging.getLogger(__name__)

_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


class FlexibleArgumentParser(argparse.ArgumentParser):
    """vLLM's parser rule: `--max_model_len` is `--max-model-len` (underscores in a flag's name
    become dashes; values are left alone)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(normalize_flags(sys.argv[1:] if args is None else args), namespace)


def normalize_flags(argv: Sequence[str]) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _json_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list such as '[\"*\"]', got {value!r}: {e}") from None
    if not isinstance(parsed, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list such as '[\"*\"]', got {value!r}")
    return parsed


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `perfxlm serve`'s arguments to `parser`: the positional model (or `--model`), the
    frontend flags and the engine flags. Returns the parser."""
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("model_tag", nargs="?", default=None, metavar="model",
                        help=f"the model to serve: an HF directory, a .gguf file, a cached or the embedded name "
                             f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    g = parser.add_argument_group("frontend")
    g.add_argument("--host", default=None, help="address to bind (default: all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--uds", default=None, help="a Unix domain socket to listen on instead of host and port")
    g.add_argument("--api-key", nargs="+", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: env VLLM_API_KEY)")
    g.add_argument("--allowed-origins", type=_json_list, default=[], help="CORS origins as a JSON list")
    g.add_argument("--allowed-methods", type=_json_list, default=["*"])
    g.add_argument("--allowed-headers", type=_json_list, default=["*"])
    g.add_argument("--allow-credentials", action=bool_flag, default=False)
    g.add_argument("--root-path", default=None, help="the path prefix of a proxy in front of the server")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template: a file path or the template")
    g.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string"],
                   help="how message content reaches the template ('openai' parts are not supported)")
    g.add_argument("--trust-request-chat-template", action=bool_flag, default=False,
                   help="let requests bring their own chat_template")
    g.add_argument("--default-chat-template-kwargs", type=json_dict_arg, default=None,
                   help="JSON object passed to the chat template; a request's chat_template_kwargs win")
    g.add_argument("--response-role", default="assistant", help="the role of replies when add_generation_prompt")
    g.add_argument("--enable-force-include-usage", action=bool_flag, default=False,
                   help="every stream carries usage, as with stream_options include_usage + continuous")
    g.add_argument("--enable-prompt-tokens-details", action=bool_flag, default=False)
    g.add_argument("--return-tokens-as-token-ids", action=bool_flag, default=False,
                   help="logprob tokens as 'token_id:N'")
    g.add_argument("--enable-request-id-headers", action=bool_flag, default=False,
                   help="answer with an X-Request-Id header")
    g.add_argument("--max-log-len", type=int, default=None, help="characters of a prompt logged at DEBUG")
    g.add_argument("--uvicorn-log-level", default="info", choices=_LOG_LEVELS)
    g.add_argument("--disable-uvicorn-access-log", action=bool_flag, default=False)
    g.add_argument("--disable-fastapi-docs", action=bool_flag, default=False)
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def validate_parsed_serve_args(args: argparse.Namespace) -> None:
    """Settle the model argument and check what vLLM checks at startup; raises ValueError or
    TypeError with a message naming the flag."""
    if args.model_flag is not None:
        if args.model_tag is not None and args.model_tag != args.model_flag:
            raise ValueError(f"two models given: {args.model_tag!r} (positional) and --model {args.model_flag!r}")
        logger.warning("With `perfxlm serve`, you should provide the model as a positional argument "
                       "instead of via the `--model` option. The `--model` option will be removed in a future "
                       "version.")
    model = args.model_flag or args.model_tag
    if model is None and args.served_model_name:
        raise ValueError("--served-model-name needs the model as a positional argument")
    args.model = model or DEFAULT_MODEL
    if args.api_key is None and os.environ.get("VLLM_API_KEY"):
        args.api_key = [os.environ["VLLM_API_KEY"]]
    args.chat_template = load_chat_template(args.chat_template)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len must be >= 0, got {args.max_log_len}")


def load_chat_template(template: str | None) -> str | None:
    """A template given as a file or inline, checked to be valid Jinja."""
    if template is None:
        return None
    if os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    elif "{" not in template and (os.sep in template or template.endswith(".jinja")):
        raise ValueError(f"--chat-template: no such file {template!r}")
    import jinja2
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not a valid Jinja template: {e}") from None
    return template
