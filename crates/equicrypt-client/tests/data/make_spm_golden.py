#!/usr/bin/env python3
"""Generate the llama.cpp SentencePiece (SPM) tokenizer golden file for equicrypt-client.

Tokenizes a fixed list of strings with llama.cpp (llama-cpp-python, vocab only) on the Gemma 3
270M GGUF (`tokenizer.ggml.model = "llama"`), with `add_bos=False` and both `special=True` and
`special=False`, and writes

    crates/equicrypt-client/tests/data/spm_golden_gemma3.json

as {"model", "llama_cpp_python", "vocab_size", "bos_id", "eos_id", "eot_id", "add_bos",
    "eog_ids": [...],
    "pieces": [{"id", "hex"}...],          # llama_token_to_piece(id, special=True), hex
    "cases": [{"text",
               "ids_special",              # llama_tokenize(text, add_special=False, parse_special=True)
               "ids_plain",                # ... parse_special=False
               "detok_special_hex",        # llama_detokenize(ids_special, remove_special=False, unparse_special=True)
               "detok_plain_hex"}...]}     # ... unparse_special=False

Detokenization goes through the C API directly (`llm.detokenize` caps pieces at 32 bytes and drops
a leading space after BOS).

Usage:
    python3 crates/equicrypt-client/tests/data/make_spm_golden.py [path/to/gemma-3-270m-q4_k_m.gguf]
(default: $EQUICRYPT_GEMMA3_GGUF, else models/gemma3/gemma-3-270m-q4_k_m.gguf)

Fuzzing: with GOLDEN_RANDOM=N (and GOLDEN_OUT=/tmp/x.json) N random strings are added; point the
Rust test at the result with EQUICRYPT_SPM_GOLDEN=/tmp/x.json.
"""

import ctypes
import json
import os
import random
import sys
from pathlib import Path

import llama_cpp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
OUT = Path(os.environ["GOLDEN_OUT"]) if "GOLDEN_OUT" in os.environ else HERE / "spm_golden_gemma3.json"
DEFAULT_MODEL = ROOT / "models" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"

# About 1200 tokens of English prose (public-domain style text written for this test).
LONG_PROSE = " ".join(
    [
        "The river town woke slowly on the first cold morning of autumn.",
        "Fishermen pulled their boats onto the gravel, and the smell of smoke drifted from the bakery near the bridge.",
        "Nobody in the square remembered exactly when the clock tower had stopped, but everyone agreed that it had been a long time ago, before the war, perhaps, or before the flood that carried away half of the orchard.",
        "Children ran between the market stalls, shouting the names of fruits they could not afford, while their grandmothers argued about the price of onions.",
        "In the library, an old teacher sorted letters that had never been delivered: some addressed to soldiers, some to sweethearts, and one, curiously, to the mayor of a city that no longer existed.",
        "She read each envelope twice, wrote its date in a ledger, and placed it in a wooden box lined with green felt.",
        "When the bell of the church rang nine times, the baker's apprentice came in with a basket of warm bread and asked whether any letter mentioned his family.",
        "\"Not yet,\" she said, \"but the box is deep, and patience is cheaper than bread.\"",
        "He laughed, left a loaf on the counter, and hurried back across the bridge, where the carts were already lining up for the afternoon ferry.",
    ]
)
LONG_PROSE = " ".join([LONG_PROSE] * 5)

CASES = [
    # --- English prose -----------------------------------------------------------------------
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Equivariant encryption lets a server compute on permuted token ids.",
    "It's a dog's life; we'll see, they're sure, I'd say—don't you?",
    # --- whitespace ---------------------------------------------------------------------------
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "multiple   spaces    inside  here",
    " " * 40 + "forty spaces",
    "line one\nline two\n\nline four\n",
    "\n\n\nthree newlines first",
    "tab\tseparated\t\tvalues\t",
    "mixed \t\n \n\t whitespace",
    "\r\nwindows line\r\n",
    " ",
    "\n",
    # --- digits and punctuation ---------------------------------------------------------------
    "12345678901234567890",
    "3.14159, 2.71828 and 1,000,000.00",
    "Call +1 (800) 555-0199 or e-mail someone@example.com!",
    "!!!???...;;;:::---___***",
    # --- code ---------------------------------------------------------------------------------
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "def f(x):\n\treturn x ** 2  # square\n",
    "if (a <= b && c != d) { x += 1; } // <b>bold</b> <table><tr><td>1</td></tr></table>",
    # --- accents / scripts --------------------------------------------------------------------
    "Café crème brûlée, naïve façade, Ångström, Straße",
    "Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم. नमस्ते दुनिया",
    "e\u0301 combining acute vs \u00e9 precomposed",
    # --- CJK ----------------------------------------------------------------------------------
    "你好，世界！我爱自然语言处理。",
    "こんにちは世界、カタカナとひらがな。안녕하세요 세계",
    # --- emoji --------------------------------------------------------------------------------
    "I ❤️ Rust 🦀 and 👨‍👩‍👧‍👦 families 🇺🇸🇯🇵",
    "emoji😀without😀spaces",
    # --- byte fallback (rare / unassigned / private-use codepoints) ---------------------------
    "rare \U0001F9FF\U00010348\U0001D11E\U000E0100 chars",
    "private use \ue000\U000F0000 and unassigned \u0378 \U0010FFFD",
    "nul \x00 and control \x01\x7f bytes",
    # --- chat markup / special tokens -------------------------------------------------------
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nWrite a haiku about rain.<end_of_turn>\n<start_of_turn>model\nSoft rain on the roof<end_of_turn>\n<eos>",
    "text<end_of_turn>more<eos>",
    "<pad><unk><mask>[multimodal]<unused0><unused6241>",
    "<start_of_image> image here <end_of_image>",
    "<s>not special in gemma</s> <b>bold</b>",
    "<start_of_turn",
    "<<end_of_turn>>",
    "<0x41> looks like a byte token",
    # --- long prose (performance) ------------------------------------------------------------
    LONG_PROSE,
]


def random_cases(n: int, seed: int = 1234) -> list:
    """Random strings mixing words, whitespace runs, markup, special-token texts and rare
    codepoints."""
    rng = random.Random(seed)
    atoms = [
        "the", " the", "The", "hello", " world", "ing", "tion", "a", "b", " ", "  ", "   ",
        "\n", "\n\n", "\t", "\r", ".", ",", "!", "?", "'s", "(", ")", "{", "}", "<", ">", "/",
        "0", "12", "345", "é", "ü", "ß", "你", "好", "世界", "こ", "ん", "😀", "🦀", "\u200d",
        "\u0301", "\u2581", "\U0010fffd", "\ue000", "\u0378", "\x00", "\x7f",
        "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
        "<unused7>", "</s>", "<s>", "<b>", "</b>", "<table>", "[multimodal]", "<start_of_image>",
        "<0x41>", "<start_of", "_turn>", "user", "model", "▁▁",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        parts = []
        for _ in range(k):
            if rng.random() < 0.15:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
            else:
                parts.append(rng.choice(atoms))
        out.append("".join(parts))
    return out


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("EQUICRYPT_GEMMA3_GGUF", DEFAULT_MODEL))
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def piece(tok: int, special: bool) -> bytes:
        buf = (ctypes.c_char * 1024)()
        n = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        return bytes(buf[:n])

    def detok(ids, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        cap = 64 + 64 * len(ids)
        buf = (ctypes.c_char * cap)()
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, False, unparse_special)
        assert 0 <= n <= cap, n
        return bytes(buf[:n])

    texts = list(CASES)
    if "GOLDEN_RANDOM" in os.environ:
        texts += random_cases(int(os.environ["GOLDEN_RANDOM"]))
    cases = []
    for text in texts:
        raw = text.encode("utf-8")
        ids_special = llm.tokenize(raw, add_bos=False, special=True)
        ids_plain = llm.tokenize(raw, add_bos=False, special=False)
        cases.append(
            {
                "text": text,
                "ids_special": ids_special,
                "ids_plain": ids_plain,
                "detok_special_hex": detok(ids_special, True).hex(),
                "detok_plain_hex": detok(ids_special, False).hex(),
            }
        )

    sample = sorted(
        set(range(0, 300))  # control, user-defined, unused, byte tokens and the first normal ones
        | set(range(490, 520))
        | set(range(255960, 256010))
        | {n_vocab - 1, 1000, 5000, 20000, 100000, 200000}
    )
    pieces = [{"id": i, "hex": piece(i, True).hex()} for i in sample if i < n_vocab]

    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    golden = {
        "model": model.name,
        "llama_cpp_python": llama_cpp.__version__,
        "vocab_size": n_vocab,
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "eot_id": llama_cpp.llama_vocab_eot(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": eog,
        "pieces": pieces,
        "cases": cases,
    }
    # One line per piece / case keeps the file diffable without one line per id.
    head = {k: v for k, v in golden.items() if k not in ("pieces", "cases")}
    lines = [json.dumps(head, ensure_ascii=False)[:-1] + ","]
    for key in ("pieces", "cases"):
        items = [json.dumps(x, ensure_ascii=False) for x in golden[key]]
        lines.append(f' "{key}": [\n  ' + ",\n  ".join(items) + "\n ]" + ("," if key == "pieces" else ""))
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == golden
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}: {len(cases)} cases, {len(pieces)} pieces, eog {eog}")


if __name__ == "__main__":
    main()
