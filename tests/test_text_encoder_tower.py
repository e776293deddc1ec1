"""The open_clip-free text path: our BPE against open_clip's, our text tower against open_clip's CLIP, and
generation that never imports open_clip."""
from __future__ import annotations

import html
import os
import random
import subprocess
import sys

import open_clip
import pytest
import torch
from open_clip.tokenizer import basic_clean, whitespace_clean
from test_text_encoder import TINY
from tiny_stages import save_stages

from latentdiff.checkpoint import load_model_files, save_model_files
from latentdiff.config import apply_overrides
from latentdiff.errors import CheckpointError
from latentdiff.models import clip_bpe as bpe_module
from latentdiff.models.clip_bpe import PLAIN_TEXT, clean, clip_bpe
from latentdiff.models.clip_text_tower import CLIPTextTower
from latentdiff.models.text_encoder import TextEncoder, TextEncoderConfig
from latentdiff.models.text_encoder_clip_tower import CLIPTowerTextEncoder, is_text_key
from latentdiff.models.text_encoder_openclip import OpenCLIPTextEncoder, build_clip

PROMPTS = [
    "a red circle", "", "A Big BLUE Square, on the LEFT!!", "two small green triangles... (3 of them?)",
    "  extra   white\tspace\r\nand\nnew lines  ", "digits 0123456789 and 3.14159 and 1,000,000",
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "don't won't they're I'LL we've she'd",
    "café naïve résumé Straße Ærø", "東京 の 赤い 円", "Привет мир", "emoji 😀🔴🟦 ❤️ 👍🏽", "ﬁne ﬂower ＬＯＵＤ",
    "&amp; &lt;3 &gt; &quot;quoted&quot; &#39;single&#39; &amp;amp; &nbsp;x &hellip;", "it\u2019s \u201ccurly\u201d",
    "<start_of_text> spelled out <end_of_text>", "\x1b[31mred\x1b[0m and a\x0bvertical tab and a\x00nul",
    "under_score hy-phen sl/ash back\\slash @#$%^*", "mojibake: cafÃ© â€œquotedâ€\x9d",
]


def open_clip_clean(text: str) -> str:
    """open_clip's own cleaning (SimpleTokenizer's default 'lower')."""
    return whitespace_clean(basic_clean(text)).lower()


def test_bpe_gives_open_clip_token_ids():
    reference = open_clip.SimpleTokenizer()
    ours = clip_bpe()
    assert (ours.start_id, ours.end_id) == (reference.sot_token_id, reference.eot_token_id) == (49406, 49407)
    for prompt in PROMPTS:
        assert ours.encode(prompt) == reference.encode(prompt), prompt
    assert clip_bpe() is ours  # read once per process


def test_bpe_decodes_as_open_clip_does():
    reference, ours = open_clip.SimpleTokenizer(), clip_bpe()
    for prompt in PROMPTS:
        ids = [ours.start_id, *ours.encode(prompt), ours.end_id]
        assert ours.decode(ids) == reference.decode(ids), prompt
    rng = random.Random(0)  # any ids, a character's UTF-8 bytes split between tokens included
    for _ in range(200):
        ids = [rng.randrange(49408) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == reference.decode(ids), ids


def test_plain_ascii_skips_ftfy_without_changing_anything():
    """Printable ASCII without '&', plus tab and line breaks, is cleaned the same with or without
    ftfy.fix_text; what the rule leaves out really differs without it."""
    rng = random.Random(0)
    plain = [chr(c) for c in range(0x20, 0x7f) if chr(c) != "&"] + ["\t", "\n", "\r", "\r\n", " ", "  "]
    everything = [chr(c) for c in range(128)] + ["&amp;", "&amp;amp;", "&lt;", "&#39;", "&NBSP;", "&EACUTE;",
                                                  "\r\n", "\x1b[31m", "<", ">", " ", "é"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for alphabet in (plain, everything)
             for _ in range(1500)]
    reference = open_clip.SimpleTokenizer()
    fast = 0
    for text in texts:
        assert clean(text) == open_clip_clean(text), repr(text)
        assert clip_bpe().encode(text) == reference.encode(text), repr(text)
        fast += bool(PLAIN_TEXT.fullmatch(text))
    assert fast >= 1500  # every plain one, and a few of the others

    def without_ftfy(text):
        return " ".join(html.unescape(html.unescape(text)).split()).lower()
    for text in ["&amp;amp;amp;", "&EACUTE;", "a\x0bb", "\x1b[31mred", "a\x00b"]:  # why they are not plain
        assert not PLAIN_TEXT.fullmatch(text) and without_ftfy(text) != open_clip_clean(text)


def test_missing_vocabulary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bpe_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="bpe_simple_vocab_16e6.txt.gz not found.*open_clip_torch"):
        bpe_module.vocab_path()


@pytest.mark.parametrize("config", [TINY, apply_overrides(TINY, {"layers": 1, "mlp_ratio": 2.0, "embed_dim": 8})])
def test_tower_keys_and_shapes_are_open_clips_text_keys(config):
    clip = build_clip(config).state_dict()
    ours = {k: tuple(v.shape) for k, v in CLIPTextTower(config).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in clip.items() if is_text_key(k)}
    assert {k for k in clip if not is_text_key(k)} == {"logit_scale", *(k for k in clip if k.startswith("visual."))}


@pytest.fixture(scope="module", params=[(True, "last"), (True, "penultimate"), (False, "last"),
                                        (False, "penultimate")], ids=lambda p: f"causal={p[0]}-{p[1]}")
def saved(request, tmp_path_factory):
    causal, output_layer = request.param
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tower") / "text_encoder"
    OpenCLIPTextEncoder(apply_overrides(TINY, {"causal": causal, "output_layer": output_layer})).save_pretrained(
        folder, metadata={"step": 3})
    return folder


def test_text_only_load_matches_open_clip(saved):
    full = TextEncoder.from_pretrained(saved)
    text_only = TextEncoder.from_pretrained(saved, image_tower=False)
    assert isinstance(full, OpenCLIPTextEncoder) and full.has_image_tower
    assert type(text_only) is CLIPTowerTextEncoder and isinstance(text_only.clip, CLIPTextTower)
    assert not text_only.has_image_tower and text_only.config == full.config
    assert text_only.identity == full.identity and text_only.identity.weights_hash
    assert (text_only.context_length, text_only.width, text_only.pooled_dim) == (16, 32, 24)
    prompts = ["a red circle", "", "two small green triangles on the left of a big blue square"]
    with torch.no_grad():
        ours, theirs = text_only.encode(prompts), full.encode(prompts)
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(ours.states, theirs.states, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pooled, theirs.pooled, atol=1e-6, rtol=0)
    if full.config.causal and full.output_layer == "last":  # and open_clip's own encode_text, for the pooled
        ids = open_clip.tokenize(prompts, context_length=16)
        with torch.no_grad():
            torch.testing.assert_close(ours.pooled, full.clip.encode_text(ids), atol=1e-6, rtol=0)


def test_text_only_round_trip(saved, tmp_path):
    text_only = TextEncoder.from_pretrained(saved, image_tower=False)
    text_only.save_pretrained(tmp_path / "text_only")  # the text keys alone
    _, state, _ = load_model_files(tmp_path / "text_only", kind="text_encoder", config_class=TextEncoderConfig)
    assert all(is_text_key(k) for k in state)
    again = TextEncoder.from_pretrained(tmp_path / "text_only")  # open_clip's CLIP, text-only (no visual.*)
    assert isinstance(again, OpenCLIPTextEncoder) and not again.has_image_tower
    with torch.no_grad():
        assert torch.equal(again.encode(["a red circle"]).states, text_only.encode(["a red circle"]).states)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_stages(tmp_path_factory.mktemp("stages"))


def test_every_text_key_must_fit(stages, tmp_path):
    config, state, _ = load_model_files(stages["text_encoder"], kind="text_encoder", config_class=TextEncoderConfig)
    for name, broken, message in [
        ("missing", {k: v for k, v in state.items() if k != "ln_final.bias"}, r"missing keys \[ln_final.bias\]"),
        ("extra", {**state, "transformer.resblocks.9.ln_1.weight": torch.ones(32)}, "unexpected keys"),
        ("shape", {**state, "positional_embedding": torch.zeros(8, 32)},
         r"shape mismatch \[positional_embedding \(8, 32\)"),
    ]:
        save_model_files(tmp_path / name, kind="text_encoder", config=config, state_dict=broken)
        with pytest.raises(CheckpointError, match=message):
            TextEncoder.from_pretrained(tmp_path / name, image_tower=False)


def test_open_clip_architectures_load_through_open_clip(tmp_path):
    with pytest.raises(ValueError, match="built by open_clip"):
        CLIPTextTower(TextEncoderConfig(open_clip_model="ViT-H-14"))
    with pytest.raises(CheckpointError, match="no image tower"):
        CLIPTowerTextEncoder._from_weights(TINY, {}, tmp_path, image_tower=True)


def run_python(code: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


LOADED = "print(sorted(m for m in ('open_clip', 'ftfy', 'torchvision', 'transformers') if m in sys.modules))"


def test_text_only_load_and_generate_never_import_open_clip(stages, tmp_path):
    code = (f"import sys\nfrom latentdiff.models.text_encoder import TextEncoder\n"
            f"TextEncoder.from_pretrained({str(stages['text_encoder'])!r}, image_tower=False).encode(['a red circle'])"
            f"\n{LOADED}")
    assert run_python(code) == "[]"

    code = (f"import sys\nfrom latentdiff.cli import main\n"
            f"assert main(['generate', 'a red circle', '--pipeline', {str(stages['unet'])!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--steps', '2', '--seed', '0']) == 0\n{LOADED}")
    assert run_python(code) == "[]"
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
