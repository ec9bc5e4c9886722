"""Caption encoders, the caption cache and the autoencoders (parallm/video/text.py,
parallm/video/autoencoder.py) against transformers / diffusers called directly, on tiny random
models written to a temporary directory (nothing is downloaded)."""

import json

import pytest
import torch

from parallm.errors import UserError
from parallm.video.autoencoder import ImageVAE, PixelSpace, make_autoencoder
from parallm.video.text import (
    CaptionCache,
    CaptionTokenizer,
    T5TextEncoder,
    load_text_encoder,
    main,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

WORDS = "a red blue green circle square moves left right up down slowly quickly on white".split()
CAPTIONS = ["a red circle moves left", "A blue square moves up, slowly.", "green", ""]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 encoder and a word-level tokenizer that appends </s>, as T5's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    d = tmp_path_factory.mktemp("t5")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", ",", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(d)
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(d)
    return d


def _reference(d, captions, max_length):
    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = transformers.T5EncoderModel.from_pretrained(d, local_files_only=True).eval()
    t = tok(
        captions, max_length=max_length, padding="max_length", truncation=True,
        return_attention_mask=True, add_special_tokens=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        y = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    return y[:, None], t["attention_mask"]


def test_t5_equals_transformers_and_counts_truncation(t5_dir):
    enc = T5TextEncoder(t5_dir, max_length=5)
    assert enc.caption_channels == 16
    y, mask, truncated = enc.encode(CAPTIONS)
    ref_y, ref_mask = _reference(t5_dir, CAPTIONS, 5)
    assert y.shape == (4, 1, 5, 16)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask)
    # words + </s>: 5 + 1 and 7 + 1 tokens are cut to 5; "green" is 2, "" is 1 (</s> alone)
    assert truncated == 2
    assert mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert enc.encode(CAPTIONS[2:]).truncated == 0


def test_t5_bad_directories(tmp_path):
    with pytest.raises(UserError, match="video.text_encoder: .* is not a directory"):
        T5TextEncoder(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no T5 config.json"):
        T5TextEncoder(tmp_path)


def test_caption_cache_hits_and_equals_direct_encoding(t5_dir, tmp_path):
    enc = T5TextEncoder(t5_dir, max_length=6)
    calls = []
    real = enc.encode
    enc.encode = lambda captions: calls.append(list(captions)) or real(captions)
    cache = CaptionCache.for_encoder(tmp_path / "cache", enc)
    with pytest.raises(UserError, match="video.caption_cache: .* is not in"):
        cache.get(CAPTIONS[:1])
    assert cache.precompute(enc, CAPTIONS + CAPTIONS[:2], batch_size=3) == (4, 1)
    assert calls == [CAPTIONS[:3], CAPTIONS[3:]]  # distinct captions, batched
    assert cache.precompute(enc, CAPTIONS) == (0, 0) and len(calls) == 2  # all hits
    y, mask = cache.get(CAPTIONS[::-1])
    ref_y, ref_mask = real(CAPTIONS[::-1])[:2]
    assert torch.equal(mask, ref_mask)
    # real tokens bit-identical; padding zeros (the model's cross-attention never reads it)
    keep = ref_mask[:, None, :, None].bool()
    assert torch.equal(y, torch.where(keep, ref_y, torch.zeros(())))
    # another max_length or encoder is another key
    assert CaptionCache(tmp_path / "cache", enc.name, 5).missing(CAPTIONS) == CAPTIONS
    with pytest.raises(UserError, match="caption_cache: encoder"):
        CaptionCache(tmp_path / "cache", "other", 6).precompute(enc, CAPTIONS)


def test_cache_command(t5_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"path": f"{i}.mp4", "text": c}) + "\n" for i, c in
                            enumerate(CAPTIONS[:3] * 2)))  # fmt: skip
    args = ["cache", "--encoder", str(t5_dir), "--data", str(data), "--out", str(tmp_path / "c")]
    assert main([*args, "--max-length", "4"]) == 0
    assert "3 captions encoded" in capsys.readouterr().out
    enc = T5TextEncoder(t5_dir, max_length=4)
    assert CaptionCache.for_encoder(tmp_path / "c", enc).missing(CAPTIONS[:3]) == []


def test_caption_tokenizer_round_trip_and_truncation(tmp_path):
    tok = CaptionTokenizer.train(CAPTIONS * 3 + ["a square moves right"], vocab_size=64)
    assert tok.vocab_size == 16  # 3 specials + 11 words + ',' + '.'
    ids, mask, truncated = tok.encode(CAPTIONS, max_length=6)
    vocab = tok.tokenizer.get_vocab()
    words = ["a", "blue", "square", "moves", "up", ","]
    assert ids[1].tolist() == [vocab[w] for w in words[:5]] + [2]  # cut: 5 words + [EOS]
    assert ids[2].tolist() == [vocab["green"], 2, 0, 0, 0, 0]
    assert ids[3].tolist() == [2, 0, 0, 0, 0, 0]
    assert mask.tolist() == [[1] * 6, [1] * 6, [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert truncated == 1  # "a red circle moves left" + [EOS] fits exactly
    assert tok.encode(["RED Purple"], max_length=4).y.tolist() == [[vocab["red"], 1, 2, 0]]
    tok.save(tmp_path)
    loaded = load_text_encoder("trainable", model_dir=tmp_path, max_length=6)
    assert loaded.name == tok.name and loaded.vocab_size == 16
    assert torch.equal(loaded.encode(CAPTIONS).y, ids)
    with pytest.raises(UserError, match="caption tokenizer .* does not exist"):
        CaptionTokenizer.load(tmp_path / "nothing")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
        layers_per_block=1, scaling_factor=0.5,
    )  # fmt: skip
    vae.save_pretrained(d)
    return d


def test_image_vae_equals_diffusers_frame_by_frame(vae_dir):
    ae = ImageVAE(vae_dir, micro_frames=4)  # 2 x 3 frames folded: micro-batches of 4 and 2
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (4, 2, 1)
    ref = diffusers.AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    video = torch.rand(2, 3, 3, 8, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 4, 3, 4, 3)
    x = ae.decode(z)
    with torch.no_grad():
        for b in range(2):
            for t in range(3):
                frame = video[b, :, t][None]
                ref_z = ref.encode(frame).latent_dist.mean * 0.5
                torch.testing.assert_close(z[b, :, t], ref_z[0], rtol=1e-5, atol=1e-6)
                ref_x = ref.decode(z[b, :, t][None] / 0.5).sample.clamp(-1, 1)
                torch.testing.assert_close(x[b, :, t], ref_x[0], rtol=1e-5, atol=1e-6)
    out = ae.decode(z * 50)
    assert out.shape == video.shape and out.abs().max() <= 1
    sampled = ae.encode(video, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, z)
    assert torch.equal(sampled, ae.encode(video, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(UserError, match="video.width: 5 is not divisible .* factor 2"):
        ae.encode(video[..., :5])


def test_pixel_space_and_make_autoencoder(vae_dir, tmp_path):
    ae = make_autoencoder("")
    assert isinstance(ae, PixelSpace)
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (3, 1, 1)
    video = torch.rand(1, 3, 2, 4, 4) * 2 - 1
    assert ae.encode(video) is video and torch.equal(ae.decode(video), video)
    assert ae.latent_size(5, 7, 3) == (5, 7, 3)
    assert isinstance(make_autoencoder(str(vae_dir)), ImageVAE)
    with pytest.raises(UserError, match="video.vae: .* is not a directory"):
        make_autoencoder(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL directory"):
        make_autoencoder(str(tmp_path))
