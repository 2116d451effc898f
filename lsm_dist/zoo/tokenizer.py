"""A character-level tokenizer for the model zoo, built locally (no hub download).

Vocabulary: the four specials ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3), then
the 95 printable ASCII characters (space .. ``~``) and ``"\\n"``: 100 ids in all, fixed forever
(every zoo model shares it, which merging needs). Any other character encodes to ``<unk>``.

Encoding: each character is one token; the post-processor prepends ``<bos>`` whenever
``add_special_tokens=True`` (the default of ``tokenizer(text)`` and of lm-eval's HF backend),
so ``tokenizer("Q: 2+3= A:")`` gives ``[<bos>, "Q", ":", " ", ...]``. No ``<eos>`` is
appended; models are trained to emit ``<eos>`` after an answer, so greedy generation stops
there. Decoding concatenates characters (``decoders.Fuse``), so ``decode(encode(s))`` round
trips for ASCII text. The wrapped ``PreTrainedTokenizerFast`` saves to ``tokenizer.json`` +
``tokenizer_config.json`` and reloads with ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHARS: tuple[str, ...] = tuple(chr(i) for i in range(32, 127)) + ("\n",)
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARS)


def char_vocab() -> dict[str, int]:
    """Token → id for the fixed vocabulary (specials first)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The zoo tokenizer as a ``transformers`` fast tokenizer (BOS added on encode)."""
    vocab = char_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, BOS_ID)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
    hf.padding_side = "right"
    return hf
