#!/usr/bin/env python3
"""Generate the llama.cpp tokenizer golden file for equicrypt-client.

Tokenizes a fixed list of strings with llama.cpp (via llama-cpp-python, vocab only) using
`add_bos=False, special=True` and writes

    crates/equicrypt-client/tests/data/tokenizer_golden.json

as {"model": ..., "llama_cpp_python": ..., "eog_ids": [...], "bos_id": .., "eos_id": ..,
    "vocab_size": .., "pieces": [{"id", "hex"}...], "cases": [{"text", "ids"}...]}.

`pieces` holds llama.cpp's `token_to_piece(id, special=True)` bytes (hex) for a sample of ids.

Usage:
    python3 scripts/gen_tokenizer_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
(default: $EQUICRYPT_SMOLLM2, else models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)

Fuzzing: with GOLDEN_RANDOM=N (and GOLDEN_OUT=/tmp/x.json) N random strings are added; point the
Rust test at the result with EQUICRYPT_TOKENIZER_GOLDEN=/tmp/x.json.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ["GOLDEN_OUT"]) if "GOLDEN_OUT" in os.environ else ROOT / "crates" / "equicrypt-client" / "tests" / "data" / "tokenizer_golden.json"
DEFAULT_MODEL = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CASES = [
    # --- English prose -------------------------------------------------------------------
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Equivariant encryption lets a server compute on permuted token ids.",
    "A sentence with    multiple   spaces   inside.",
    "UPPERCASE TEXT AND lowercase text And Mixed Case",
    "e-mail: someone@example.com, url: https://example.com/path?q=1&r=2#frag",
    "Mr. Smith's dog (named \"Rex\") barked; then—silence...",
    "semi;colon, comma. period! bang? question: colon",
    # --- contractions ----------------------------------------------------------------------
    "I'm here",
    "they'll go",
    "DON'T SHOUT",
    "we've, you're, she'd, it's, can't",
    "WE'VE YOU'RE SHE'D IT'S",
    "rock 'n' roll",
    "''quoted''",
    "'s 't 're 've 'm 'll 'd",
    "O'Neil's",
    "don’t (curly apostrophe)",
    # --- digits and numbers ----------------------------------------------------------------
    "12345678",
    "1",
    "42 is the answer",
    "3.14159265358979",
    "Call 555-0123 or +1 (800) 555-0199.",
    "Year 2024, version 1.2.3, build #9876543210",
    "0x1F 0b1010 1e-9 1_000_000",
    "a1b2c3d4",
    " 7",
    "  99  ",
    "١٢٣٤ (Arabic-Indic digits)",
    "Ⅻ ½ ² ³ ①",
    "１２３ full-width digits",
    # --- whitespace ------------------------------------------------------------------------
    " ",
    "  ",
    "    ",
    "\n",
    "\n\n\n",
    "\t",
    "\t\t indented",
    " leading space",
    "trailing space ",
    "  leading and trailing  ",
    "line one\nline two\n",
    "para one\n\npara two\n\n\n\npara three",
    "windows\r\nline endings\r\n",
    "mixed \t \n whitespace \n\t ",
    "no-break\u00a0space and\u3000ideographic space",
    "nel\u0085char and line\u2028separator",
    "\u2003em space\u2009thin",
    "x \n y",
    # --- code ------------------------------------------------------------------------------
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = 1  # comment\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"hi\\n\");\n    return 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{v:?}\");\n}\n",
    "const f = async (x) => { await g(x); return x ?? null; };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"a\">\n  <span>text</span>\n</div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "if x == 1:\n\tpass\nelif x != 2:\n\t\tpass\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -v '^#' && ls -la ~/\n",
    "x=>x*2;y=x**2//3%4",
    "a  =  b\t\t// aligned",
    "    indented four\n        indented eight\n",
    "\tTabbed\n\t\tDouble tabbed\n",
    "print('single') + print(\"double\") + `backtick`",
    "std::vector<std::string> v{\"a\", \"b\"};",
    "$var @decorator %mod ^xor ~not |pipe &amp;",
    "// TODO(user): fix this!!!",
    "\t \t",
    "end of code   \n   ",
    # --- punctuation -----------------------------------------------------------------------
    "!!!???...",
    "...",
    "—–-",
    "«guillemets» „quotes“ 'single' “double”",
    "#hashtag @mention $100 50% 3*4=12",
    "(parens) [brackets] {braces} <angles>",
    "a.b,c;d:e!f?g",
    "…and so on",
    # --- accents / Latin ---------------------------------------------------------------------
    "Café déjà vu.",
    "naïve façade résumé coöperate",
    "Straße, Größe, Übermut",
    "Ñandú español",
    "Ærøskøbing Ålesund",
    "ąęćżźńół Łódź",
    "Çà et là, l'été",
    # --- combining marks ---------------------------------------------------------------------
    "e\u0301 (e + combining acute)",
    "a\u0308o\u0308u\u0308",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dalgo",
    "\u0301leading combining mark",
    "क्षत्रिय हिन्दी",
    # --- Greek / Cyrillic / other scripts --------------------------------------------------
    "Γειά σου Κόσμε",
    "Привет, мир! Как дела?",
    "Съешь же ещё этих мягких французских булок",
    "שלום עולם",
    "مرحبا بالعالم",
    "السلام عليكم ورحمة الله",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Xin chào thế giới",
    "ሰላም ልዑል",
    "Բարեւ աշխարհ",
    "გამარჯობა",
    # --- CJK ---------------------------------------------------------------------------------
    "你好，世界",
    "我爱自然语言处理。",
    "こんにちは世界",
    "カタカナとひらがな",
    "안녕하세요 세계",
    "漢字かな交じり文",
    "中文English混合123",
    "𠜎𠜱𠝹𠱓 (CJK Extension B)",
    # --- emoji ---------------------------------------------------------------------------------
    "😀",
    " 😀",
    "I ❤️ Rust 🦀",
    "👍🏽 thumbs up medium skin tone",
    "👨‍👩‍👧‍👦 family ZWJ sequence",
    "🏳️‍🌈 rainbow flag",
    "👩🏾‍💻 technologist",
    "🇺🇸🇯🇵🇩🇪 flags",
    "1️⃣ keycap",
    "🫨🫠🥹 newer emoji",
    "emoji😀without😀spaces",
    "!🎉!",
    # --- special tokens in text --------------------------------------------------------------
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    " <|im_end|> spaced ",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|",
    "<|im_start|>>",
    "<<|im_end|>>",
    "<repo_name>x<reponame>y<file_sep>z<filename>",
    "<gh_stars>100<issue_start><issue_comment><issue_closed>",
    "<jupyter_start><jupyter_text><jupyter_code><jupyter_output><jupyter_script><empty_output>",
    "<|unknown_special|>",
    "<s></s>",
    # --- odd / invalid-looking content ------------------------------------------------------
    "\ufffd replacement char",
    "\ufffd\ufffd\ufffd",
    "\x00 nul byte",
    "\x01\x02\x03\x7f control chars",
    "\x1b[31mANSI red\x1b[0m",
    "\u200b zero\u200bwidth \u200c\u200d joiners",
    "\ufeffBOM at start",
    "private use \ue000\ue001",
    "unassigned \u0378 codepoint",
    "\u0378's \u0378'll x\u0378'S (unassigned before a contraction)",
    "noncharacter \ufffe\uffff",
    "\U0010fffd plane 16",
    "\U000e0100 variation selector supplement",
    "Ã©Ã¨ mojibake",
    "\\x80\\xff escaped bytes",
    "ĠċĊ byte-level lookalikes",
    "a" * 300,
    "ab " * 100,
    "🙂" * 20,
    "",
]


def random_cases(n: int) -> list:
    """Random strings mixing ASCII, whitespace, digits, scripts, emoji and special tokens."""
    import random

    rng = random.Random(1234)
    alphabet = (
        list("abcXYZ019 '\t\n\r.,!?-_()[]{}<>|/\\\"#$%^&*+=~`")
        + list("éüßñçøå ́̈ΑβγЖжשׁعربي中文日本語한국어१२३٤٥")
        + ["\u00a0", "\u3000", "\u2028", "\u0085", "\u200b", "\u200d", "\ufe0f", "\ufffd",
           "\ue000", "\u0378", "\U0001f600", "\U0001f468", "\U0001f3fd", "\U0001faf0",
           "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<reponame>", "'s", "'ll", "12345"]
    )
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)
    ]


def token_piece(llama_cpp, vocab, token: int) -> bytes:
    """llama_token_to_piece(special=True) with a buffer that fits any token.

    (Llama.detokenize uses a 32-byte buffer and silently returns b"" for longer pieces.)
    """
    import ctypes

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def main() -> int:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(
        os.environ.get("EQUICRYPT_SMOLLM2", str(DEFAULT_MODEL))
    )
    if not model.exists():
        print(f"model not found: {model}", file=sys.stderr)
        return 1

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    if len(CASES) != len(set(CASES)):
        print("duplicate cases", file=sys.stderr)
        return 1

    texts = list(CASES) + random_cases(int(os.environ.get("GOLDEN_RANDOM", "0")))
    cases = []
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": text, "ids": [int(i) for i in ids]})

    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    sample = sorted(set(list(range(0, 300)) + list(range(300, n_vocab, 97)) + [n_vocab - 1]))
    pieces = [{"id": i, "hex": token_piece(llama_cpp, vocab, i).hex()} for i in sample]

    doc = {
        "model": model.name,
        "llama_cpp_python": llama_cpp.__version__,
        "vocab_size": n_vocab,
        "bos_id": int(llama_cpp.llama_vocab_bos(vocab)),
        "eos_id": int(llama_cpp.llama_vocab_eos(vocab)),
        "eog_ids": eog,
        "pieces": pieces,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases, {len(pieces)} pieces, eog={eog} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
