"""Corpus, chat template and tokenizer for the embedded demo model.

The corpus is built from the docstrings of the running interpreter's standard library (PSF License), read with
`ast` from the source files in sorted order, so two runs on the same interpreter give the same bytes.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]

# One line per message: role token, newline, content, end token, newline. Kept free of helpers that only
# transformers defines (raise_exception, strftime_now), so a plain jinja2 sandbox renders it as well.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Folders of the stdlib that hold tests, third-party packages or build data rather than library code.
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "__phello__", "lib-dynload", "pydoc_data"}
SKIP_DIR_PREFIXES = ("config-",)
SKIP_FILES = {"this.py", "antigravity.py", "__hello__.py"}
# Modules whose docstrings are read under a public name: pure-Python twins of C modules, and `os.path`, which is
# posixpath (with genericpath's helpers) on the interpreters this corpus is built with.
MODULE_ALIASES = {"_pydecimal": "decimal", "_pyio": "io", "_collections_abc": "collections.abc",
                  "posixpath": "os.path", "genericpath": "os.path"}

SYSTEM_PROMPTS = [
    "You answer questions about the Python standard library.",
    "Answer briefly, using the documentation of the Python standard library.",
    "You are the hybridmoe demo model. You know the docstrings of the Python standard library.",
]
QUESTIONS = [
    "What does `{name}` do?",
    "Explain `{name}`.",
    "What is `{name}` used for?",
    "How do I use {name}?",
    "Tell me about {name}.",
    "Describe the {kind} `{name}`.",
    "What is the purpose of the {kind} `{short}` in the `{module}` module?",
    "{name}?",
    "Can you document {name} for me?",
    "I need help with `{name}`. What does it do?",
]
MODULE_QUESTIONS = [
    "What is the `{name}` module?",
    "What does the {name} module do?",
    "Tell me about the `{name}` module.",
    "What is {name} for?",
]
REVERSE_QUESTIONS = [
    "Which standard library {kind} does this: {summary}",
    "Is there a {kind} in the standard library that does the following? {summary}",
]
SMALL_TALK = [
    (["Hello", "Hi", "Hello!", "Hi there", "Good morning", "Hey"],
     "Hello. Ask me about a module, class or function of the Python standard library, for example `json.dumps`."),
    (["Who are you?", "What are you?", "What can you do?", "What do you know?"],
     "I am the small demo model of hybridmoe, a Mixture-of-Experts model trained on the docstrings of the Python "
     "standard library. Ask me what a function, class or module does, for example `textwrap.wrap`."),
    (["Thanks", "Thank you!", "Thanks, that helps."],
     "You are welcome. Ask me about another part of the standard library any time."),
]


@dataclass(frozen=True)
class DocItem:
    """One documented object: a module, class, function or method."""

    module: str
    name: str  # qualified, e.g. json.dumps or collections.OrderedDict.move_to_end
    kind: str  # module, class, function, method
    signature: str  # "(obj, *, skipkeys=False)" or ""
    doc: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(SKIP_DIR_PREFIXES) for p in parts[:-1]):
            continue
        if path.name in SKIP_FILES or path.name.startswith("_sysconfigdata"):
            continue
        files.append(path)
    return files


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    name = ".".join(parts)
    return MODULE_ALIASES.get(name, name)


_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|const|obj|term|ref|pep|rfc|envvar|option|file|"
                   r"keyword|samp|program|dfn|ref)\:`~?([^`]+)`")


def clean_doc(text: str) -> str:
    """Light reST cleanup: ``x`` -> `x`, :func:`x` -> `x`, trailing spaces and runs of blank lines removed."""
    text = _ROLE.sub(r"`\1`", text)
    text = text.replace("``", "`")
    lines = [line.rstrip() for line in text.splitlines()]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _signature(node: ast.AST, is_method: bool) -> str:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == "__init__"), None)
        return _signature(init, True) if init is not None else ""
    args = node.args
    if is_method and args.posonlyargs:
        args = ast.arguments(**{**args.__dict__, "posonlyargs": args.posonlyargs[1:]})
    elif is_method and args.args and args.args[0].arg in ("self", "cls"):
        args = ast.arguments(**{**args.__dict__, "args": args.args[1:]})
    text = "(" + ast.unparse(args) + ")"
    return text if len(text) <= 100 else "(...)"


def extract_items(root: Path | None = None) -> list[DocItem]:
    """Every docstring of the stdlib as a DocItem, in file order then source order."""
    root = root or stdlib_dir()
    items: list[DocItem] = []
    for path in stdlib_files(root):
        module = module_name(root, path)
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            items.append(DocItem(module, module, "module", "", clean_doc(doc)))

        def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
            for node in body:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                if node.name.startswith("_"):
                    continue
                qual = f"{prefix}.{node.name}"
                text = ast.get_docstring(node, clean=True)
                if isinstance(node, ast.ClassDef):
                    kind = "class"
                else:
                    kind = "method" if in_class else "function"
                if text:
                    items.append(DocItem(module, qual, kind, _signature(node, in_class), clean_doc(text)))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qual, True)

        visit(tree.body, module, False)
    return items


def is_public(item: DocItem) -> bool:
    return not any(part.startswith("_") for part in item.name.split("."))


def truncate(text: str, limit: int) -> str:
    """Keep whole paragraphs up to `limit` characters (at least the first paragraph, cut at a sentence)."""
    paras = text.split("\n\n")
    out = paras[0]
    if len(out) > limit:
        cut = out[:limit].rfind(". ")
        return out[: cut + 1] if cut > 0 else out[:limit]
    for para in paras[1:]:
        if len(out) + 2 + len(para) > limit:
            break
        out += "\n\n" + para
    return out


def summary_line(text: str) -> str:
    first = text.split("\n\n")[0].replace("\n", " ").strip()
    return first if 20 <= len(first) <= 160 and first[0].isalpha() else ""


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template rendered the way transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    return _compiled_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)


@functools.lru_cache(maxsize=1)
def _compiled_template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render_chat_plain(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Same output as CHAT_TEMPLATE, for machines without jinja2 (checked against it in `prepare`)."""
    text = BOS + "".join(f"<|{m['role']}|>\n{m['content'].strip()}{EOS}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def answer_for(item: DocItem, limit: int) -> str:
    body = truncate(item.doc, limit)
    if item.kind == "module":
        return f"`{item.name}` is a module of the standard library.\n\n{body}"
    return f"`{item.name}{item.signature}`\n\n{body}"


def build_documents(items: list[DocItem], seed: int) -> list[tuple[str, str]]:
    """(module, text) pairs: one plain-text page per module plus chat conversations, in a seeded order."""
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = []
    by_module: dict[str, list[DocItem]] = {}
    for item in items:
        by_module.setdefault(item.module, []).append(item)

    seen: set[str] = set()
    for module, group in by_module.items():
        # Plain text: the module's docstrings as a page, like `pydoc` shows it.
        parts = []
        for item in group:
            digest = hashlib.sha1(item.doc.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            head = f"# {item.name}" if item.kind == "module" else f"## {item.kind} {item.name}{item.signature}"
            parts.append(f"{head}\n\n{item.doc}")
        if parts:
            docs.append((module, BOS + "\n\n".join(parts) + EOS))

        # Chat: 1-3 questions about the same module in one conversation.
        public = [it for it in group if is_public(it) and len(it.doc) >= 30]
        convs: list[list[dict]] = []
        for item in public:
            if item.kind == "module":
                qs = rng.sample(MODULE_QUESTIONS, 2)
                fields = {"name": item.name}
            else:
                qs = rng.sample(QUESTIONS, 2)
                fields = {"name": item.name, "short": item.name.rsplit(".", 1)[-1], "module": item.module,
                          "kind": item.kind}
            for q in qs:
                convs.append([{"role": "user", "content": q.format(**fields)},
                              {"role": "assistant", "content": answer_for(item, rng.choice([400, 800, 1200]))}])
            summary = summary_line(item.doc)
            if item.kind in ("function", "class", "method") and summary:
                q = rng.choice(REVERSE_QUESTIONS).format(kind=item.kind, summary=summary)
                a = f"That is `{item.name}{item.signature}` in the `{item.module}` module."
                convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        rng.shuffle(convs)
        i = 0
        while i < len(convs):
            n = rng.choice([1, 1, 2, 3])
            messages = [m for conv in convs[i:i + n] for m in conv]
            i += n
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            docs.append((module, render_chat(messages)))

    for prompts, answer in SMALL_TALK:
        for _ in range(60):
            messages = [{"role": "user", "content": rng.choice(prompts)}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.5:
                extra = rng.choice([it for it in items if is_public(it) and it.kind == "function"
                                    and len(it.doc) >= 30])
                messages += [{"role": "user", "content": rng.choice(QUESTIONS[:5]).format(name=extra.name)},
                             {"role": "assistant", "content": answer_for(extra, 400)}]
            docs.append(("", render_chat(messages)))
    rng.shuffle(docs)
    return docs


def is_validation(module: str) -> bool:
    """About 3% of modules, chosen by a stable hash, are held out for validation."""
    return bool(module) and int(hashlib.sha1(module.encode()).hexdigest(), 16) % 32 == 0


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over the corpus; the special tokens are atomic and never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The specials are stripped from the training text so that no merge ever spans one.
    pattern = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
    tok.train_from_iterator((pattern.sub("\n", t) for t in texts), trainer=trainer)
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def corpus_meta() -> dict:
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_dir()), "licence": "PSF License"}


def dump_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
