"""Chat templates (jinja2) rendered in an immutable sandbox with limits: a model file's template must not read or
change anything it is not given, nor use gigabytes of memory or minutes of time (`('a' * 2000000000)|length`, loops
inside loops). Every loop step, call, operator, filter, attribute access and piece of output checks a deadline, and
values that grow (repetition, concatenation, calls' results, the output) are held under a size limit."""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime

from jinja2 import TemplateError, nodes
from jinja2.visitor import NodeTransformer
from jinja2.compiler import CodeGenerator
from jinja2.filters import do_format
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError

MAX_CHARS = 8 << 20  # any string or list a template builds, and its output: a million-token prompt fits
MAX_SECONDS = 5.0  # real templates render in milliseconds
HUGE_WIDTH = re.compile(r"\d{7,}")  # a field width of millions of characters in a format string
GUARD = "hybridmoe_loop_guard"  # the global every for loop's iterable passes through


class TemplateLimit(TemplateError):
    """A template went past its time or size limit."""


def _raise(message: str):
    raise TemplateError(message)


class _Codegen(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame) -> None:  # `a ~ b` is not an interceptable operator
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _GuardLoops(NodeTransformer):
    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _Codegen

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.deadline = threading.local()  # renders of one template may run in several threads
        self.globals[GUARD] = self.guard_loop
        self.filters = {name: self._guarded(f) for name, f in self.filters.items()}

    def tick(self) -> None:
        if time.monotonic() > getattr(self.deadline, "at", float("inf")):
            raise TemplateLimit(f"it ran for more than {MAX_SECONDS:g} s")

    def sized(self, value):
        self.tick()
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS:
            raise TemplateLimit(f"it built a value of {len(value)} items (the limit is {MAX_CHARS})")
        return value

    def guard_loop(self, iterable):
        for item in iterable:
            self.tick()
            yield item

    def _check_args(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
                raise TemplateLimit(f"a call was given the number {a} (the limit is {MAX_CHARS})")

    def _guarded(self, f):
        def filter_(*args, **kwargs):
            self.tick()
            self._check_args(args, kwargs)
            if f is do_format and args and isinstance(args[0], str) and HUGE_WIDTH.search(args[0]):
                raise TemplateLimit("a format string asks for a field millions of characters wide")
            return self.sized(f(*args, **kwargs))
        for attr in ("jinja_pass_arg",):  # context / environment passing markers of jinja's own filters
            if hasattr(f, attr):
                setattr(filter_, attr, getattr(f, attr))
        return filter_

    def call_binop(self, context, operator: str, left, right):
        self.tick()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                raise TemplateLimit(f"it repeats a value {n} times (the limit is {MAX_CHARS} items)")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise TemplateLimit(f"it raises a number to the power {right}")
        elif operator == "%" and isinstance(left, str) and HUGE_WIDTH.search(left):
            raise TemplateLimit("a format string asks for a field millions of characters wide")
        return self.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        __self.tick()
        __self._check_args(args, kwargs)
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str) and name == "replace" and len(args) >= 2 and isinstance(args[0], str) \
                and isinstance(args[1], str):
            if len(owner) + owner.count(args[0]) * (len(args[1]) - len(args[0])) > MAX_CHARS:
                raise TemplateLimit(f"a replace() would build more than {MAX_CHARS} characters")
        return __self.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        self.tick()
        if isinstance(obj, str) and attribute in ("format", "format_map") and HUGE_WIDTH.search(obj):
            raise TemplateLimit("a format string asks for a field millions of characters wide")
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)


class ChatTemplate:
    def __init__(self, source: str, where: str):
        env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = env._guarded(lambda x, indent=None, ensure_ascii=False:
                                             json.dumps(x, indent=indent, ensure_ascii=ensure_ascii))
        self.env, self.where = env, where
        try:
            self.template = env.from_string(_GuardLoops().visit(env.parse(source)))
        except (TemplateError, RecursionError, MemoryError) as e:
            raise ConfigError(f"{where}: chat_template does not parse ({type(e).__name__}: {e})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        env = self.env
        env.deadline.at = time.monotonic() + MAX_SECONDS
        parts, size = [], 0
        try:
            for piece in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra):
                size += len(piece)
                if size > MAX_CHARS:
                    raise TemplateLimit(f"its output passed {MAX_CHARS} characters")
                env.tick()
                parts.append(piece)
        except TemplateLimit as e:
            raise ConfigError(f"{self.where}: chat_template stopped: {e}; the template is broken or hostile") \
                from None
        except TemplateError as e:
            raise ConfigError(f"{self.where}: chat_template failed: {e}") from None
        except (RecursionError, MemoryError) as e:
            raise ConfigError(f"{self.where}: chat_template stopped: {type(e).__name__}; the template is broken or "
                              "hostile") from None
        except Exception as e:  # a template's own bug (1/0, a missing key used as a number): one line, not a trace
            raise ConfigError(f"{self.where}: chat_template failed: {type(e).__name__}: {e}") from None
        finally:
            env.deadline.at = float("inf")
        return "".join(parts)
