"""Training smoke run on the real data format: a small subset, one epoch, ONNX export that passes
the parity check, and a repository folder that the service then serves."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_client, wait_ready

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_image_classification_smoke_training_exports_a_servable_model(data_dir: Path, tmp_path: Path) -> None:
    from training import image_classification

    meta = image_classification.main(
        [
            "--smoke",
            "--data-dir",
            str(data_dir / "image_classification" / "mnist"),
            "--output-dir",
            str(tmp_path),
            "--version",
            "3",
            "--seed",
            "7",
        ]
    )
    version_dir = tmp_path / "mnist" / "3"
    assert (version_dir / "model.onnx").is_file()
    saved = json.loads((version_dir / "metadata.json").read_text())
    assert saved == meta
    assert saved["metrics"]["test_examples"] == 512
    assert 0.0 <= saved["metrics"]["test_accuracy"] <= 1.0
    assert saved["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert "--smoke" in saved["training"]["command"]
    spec = json.loads((tmp_path / "mnist" / "model.json").read_text())
    assert spec["labels"] == [str(d) for d in range(10)]

    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        meta = client.get("/v2/models/mnist").json()
        assert meta["versions"] == ["3"]
        body = {"inputs": [{"name": "image", "shape": [3, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 2352}]}
        response = client.post("/v2/models/mnist/infer", json=body)
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [3, 10]


def test_training_reads_idx_files_and_rejects_other_files(tmp_path: Path, data_dir: Path) -> None:
    import gzip

    from training.idx import read_idx
    from training.image_classification import load_split

    x, y = load_split(data_dir / "image_classification" / "mnist", "test")
    assert tuple(x.shape) == (10000, 1, 28, 28) and tuple(y.shape) == (10000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    bogus = tmp_path / "bogus.gz"
    with gzip.open(bogus, "wb") as fh:
        fh.write(b"\x00\x00\x00\x07" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(bogus)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_sentiment_smoke_training_exports_a_servable_model(data_dir: Path, tmp_path: Path, lang: str) -> None:
    from training import sentiment

    meta = sentiment.main(
        ["--smoke", "--lang", lang, "--data-dir", str(data_dir / "sentiment"), "--output-dir", str(tmp_path)]
    )
    name = "sentiment" if lang == "en" else "sentiment-zh"
    assert (tmp_path / name / "1" / "tokenizer.json").is_file()
    assert meta["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert 0.0 <= meta["metrics"]["test_accuracy"] <= 1.0
    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        text = "a fine film" if lang == "en" else "房间很干净"
        response = client.post("/v1/sentiment", json={"texts": [text, text + text]})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name


def test_sentiment_bigrams_and_ensemble_export_one_servable_graph(data_dir: Path, tmp_path: Path) -> None:
    from training import sentiment

    argv = ["--smoke", "--lang", "zh", "--data-dir", str(data_dir / "sentiment"), "--output-dir", str(tmp_path)]
    meta = sentiment.main([*argv, "--bigram-buckets", "1024", "--ensemble", "2"])
    assert meta["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4  # parity at batch > 1, padding included
    assert len(meta["metrics"]["best_epoch"]) == 2 and len(meta["metrics"]["members_validation_accuracy"]) == 2
    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        response = client.post("/v1/sentiment", json={"texts": ["房间很干净", "房间很干净，服务也很热情"]})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "sentiment-zh"


def test_two_graphs_trained_apart_combine_into_their_weighted_mean_each_fed_its_own_tokens(
    data_dir: Path, tmp_path: Path
) -> None:
    """``--combine``: a CNN with bigrams and a BiLSTM trained apart (their tokenizers may number tokens
    differently) become one graph, the second's embedding rows put in the first's token order, the
    weight chosen on validation; the graph gives the weighted mean of what each gives on its own ids."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from training import sentiment

    argv = ["--smoke", "--lang", "zh", "--data-dir", str(data_dir / "sentiment"), "--max-len", "512"]
    sentiment.main([*argv, "--output-dir", str(tmp_path / "a"), "--bigram-buckets", "1024"])
    sentiment.main([*argv, "--output-dir", str(tmp_path / "b"), "--arch", "bilstm"])
    first, second = tmp_path / "a" / "sentiment-zh" / "1", tmp_path / "b" / "sentiment-zh" / "1"
    meta = sentiment.main([*argv, "--output-dir", str(tmp_path / "c"), "--combine", str(first), str(second)])
    combined = meta["metrics"]["combined"]
    w = combined["weight_of_second"]
    assert len(combined["grid"]) == 21 and min(combined["grid"], key=lambda g: g["log_loss"])["weight"] == w
    texts = ["房间很干净，服务也很热情", "设施陈旧，卫生很差", "好"]

    def probs(version: Path) -> np.ndarray:
        tokenizer = Tokenizer.from_file(str(version / "tokenizer.json"))
        ids, mask = sentiment.pad_batch([tokenizer.encode(t).ids for t in texts])
        session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

    out = tmp_path / "c" / "sentiment-zh" / "1"
    assert np.abs(probs(out) - ((1 - w) * probs(first) + w * probs(second))).max() < 1e-5
    # Embedding tables as float16: a smaller file, the same answers to float16's precision.
    sentiment.main(
        [*argv, "--output-dir", str(tmp_path / "e"), "--combine", str(first), str(second), "--half-embeddings"]
    )
    half = tmp_path / "e" / "sentiment-zh" / "1"
    assert (half / "model.onnx").stat().st_size < 0.8 * (out / "model.onnx").stat().st_size
    assert np.abs(probs(half) - probs(out)).max() < 5e-3
    with pytest.raises(ValueError, match="max_len"):  # members must read texts as long as the graph will
        sentiment.main(
            [
                "--smoke",
                "--lang",
                "zh",
                "--data-dir",
                str(data_dir / "sentiment"),
                "--output-dir",
                str(tmp_path / "d"),
                "--combine",
                str(first),
                str(second),
            ]
        )
    assert "weighted mean" in json.loads((out.parent / "model.json").read_text())["description"]
    with make_client(repository=tmp_path / "c") as client:
        wait_ready(client)
        response = client.post("/v1/sentiment", json={"texts": texts})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "sentiment-zh"


def test_an_embedding_table_is_reordered_to_another_tokenizers_ids_and_other_readers_are_refused() -> None:
    """Two vocabularies of the same tokens numbered differently, one with a token the other lacks: the
    reordered table gives each token the row it had (a lacking token the [UNK] row)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models

    from training.sentiment import remap_embeddings

    own = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "好": 2, "差": 3, "房": 4}, unk_token="[UNK]"))
    target = Tokenizer(
        models.WordLevel({"[PAD]": 0, "[UNK]": 1, "房": 2, "好": 3, "差": 4, "新": 5}, unk_token="[UNK]")
    )
    table = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)  # row i: own id i

    def graph(*extra: onnx.NodeProto) -> onnx.ModelProto:
        nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["out"]), *extra]
        return helper.make_model(
            helper.make_graph(
                nodes,
                "g",
                [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None])],
                [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 2])],
                [numpy_helper.from_array(table, "embed")],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )

    model = graph()
    counts = remap_embeddings(model, own, target)
    assert counts == {"target_tokens_missing_from_own": 1, "own_tokens_unreachable": 0}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([target.token_to_id(t) for t in ["房", "好", "差", "新", "[PAD]"]], dtype=np.int64)
    rows = session.run(None, {"input_ids": ids})[0]
    assert rows.tolist() == table[[4, 2, 3, 1, 0]].tolist()  # each token its own row; 新 gets [UNK]'s
    shared = graph(helper.make_node("Identity", ["embed"], ["tied"]))
    with pytest.raises(ValueError, match="more than its lookup"):
        remap_embeddings(shared, own, target)


def test_sentiment_distilled_bilstm_with_composed_and_unlabelled_text_exports_a_servable_graph(
    data_dir: Path, tmp_path: Path
) -> None:
    """The recipe of the committed English model, at smoke size: a teacher of two BiLSTMs labels
    Tatoeba sentences, one student learns from it and the composed everyday sentences, and the graph
    has one LSTM op with each row's length."""
    import onnx

    from training import sentiment

    argv = ["--smoke", "--lang", "en", "--data-dir", str(data_dir / "sentiment"), "--output-dir", str(tmp_path)]
    unlabelled = data_dir / "translation" / "fra-eng.zip"
    meta = sentiment.main(
        [*argv, "--arch", "bilstm", "--distil", "2", "--unlabelled", str(unlabelled), "--everyday-synthetic", "100"]
    )
    assert meta["metrics"]["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert meta["metrics"]["teacher"]["members"] == 2 and meta["metrics"]["teacher"]["unlabelled_sentences"] == 200
    assert meta["dataset"]["composed_everyday_training_sentences"] == 100
    graph = onnx.load(str(tmp_path / "sentiment" / "1" / "model.onnx")).graph
    lstms = [node for node in graph.node if node.op_type == "LSTM"]
    assert len(lstms) == 1 and lstms[0].input[4] == "sequence_lens"
    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        response = client.post("/v1/sentiment", json={"texts": ["fine", "a fine film , and a long one"]})
        assert response.status_code == 200, response.text


def test_unlabelled_sentences_never_include_a_check_sets_sentence_and_keep_their_draw(data_dir: Path) -> None:
    # "I didn't like it." is both a Tatoeba sentence and one of our everyday check set's.
    from training import sentiment

    cfg = sentiment.Config(smoke=True, unlabelled=data_dir / "translation" / "fra-eng.zip")
    drawn, _ = sentiment.unlabelled_texts(cfg, exclude=[])
    held = [drawn[3], "I didn't like it."]
    kept, labels = sentiment.unlabelled_texts(cfg, exclude=[], held=held)
    assert kept == [t for t in drawn if t not in held] and len(kept) == len(drawn) - 1 and set(labels) == {-1}


def test_the_vocabulary_can_come_from_the_labelled_texts_alone(data_dir: Path) -> None:
    """--no-vocabulary-from-unlabelled: no piece of the vocabulary is a word that only the unlabelled
    sentences hold, while the teacher still labels them (encoded with it) for the student."""
    from training import sentiment

    cfg = sentiment.Config(
        smoke=True,
        data_dir=data_dir / "sentiment",
        distil=2,
        unlabelled=data_dir / "translation" / "fra-eng.zip",
        vocabulary_from_unlabelled=False,
    )
    tokenizer, seqs, _ = sentiment.encoded_data(cfg)

    def words(texts: list[str]) -> set[str]:
        normalise, split = tokenizer.normalizer.normalize_str, tokenizer.pre_tokenizer.pre_tokenize_str
        return {word for text in texts for word, _ in split(normalise(text))}

    train_words = words(sentiment.load_data(cfg)["train"][0][:600])
    only_unlabelled = words(sentiment.unlabelled_texts(cfg, exclude=[])[0]) - train_words
    # Words of 5 letters or more that no training word starts with cannot be a piece by chance.
    foreign = {w for w in only_unlabelled if len(w) >= 5 and not any(t.startswith(w) for t in train_words)}
    assert len(seqs["unlabelled"]) > 0 and len(foreign) > 100
    assert not foreign & set(tokenizer.get_vocab())
    with_unlabelled, _, _ = sentiment.encoded_data(dataclasses.replace(cfg, vocabulary_from_unlabelled=True))
    assert len(foreign & set(with_unlabelled.get_vocab())) >= 10  # Tatoeba's words take pieces there


def test_sentiment_pretraining_teaches_both_directions_and_leaves_the_classifier_layer_alone() -> None:
    """ULMFiT's first step at toy size: the forward LSTM learns what comes next and the backward one
    what came before (two corpora with one rule each way), through the shared embedding; the
    classifier layer, which the members train, is not touched."""
    import torch

    from training import sentiment

    torch.manual_seed(0)
    cfg = sentiment.Config(arch="bilstm", hidden=32, embed_dim=16, dropout=0.0, lr=1e-2, pretrain_epochs=6)
    model = sentiment.BiLSTM(12, cfg)
    fc = {k: v.clone() for k, v in model.fc.state_dict().items()}
    # token 2 + k is always followed by 3 + k: forward, the next token is certain; backward (reversed
    # rows), the previous one is; a model that learned nothing pays log(12) = 2.5 nats a token
    texts = [[2 + k, 3 + k, 4 + k, 5 + k] for k in range(5) for _ in range(200)]
    summary = sentiment.pretrain(model, cfg, texts)
    losses = [h["loss_nats_per_token"] for h in summary["history"]]
    assert losses[0] > 1.5 and losses[-1] < 0.6, losses
    assert all(torch.equal(fc[k], v) for k, v in model.fc.state_dict().items())


def test_fused_bilstm_graph_reads_each_row_backwards_from_its_own_end(tmp_path: Path) -> None:
    """Random weights (an untrained model's outputs are too flat to tell) and rows of 1 to 30 tokens:
    the graph with one bidirectional LSTM op and sequence_lens equals the two-LSTM torch network at
    batch 1 and batch 5; without the lengths, padding would reach the backward direction."""
    import onnxruntime as ort
    import torch

    from training import sentiment

    torch.manual_seed(0)
    model = sentiment.BiLSTM(300, sentiment.Config(arch="bilstm", hidden=32, embed_dim=16)).eval()
    for weight in model.parameters():
        weight.data.normal_(0, 0.4)
    rows = [torch.randint(2, 300, (n,)).tolist() for n in (5, 17, 1, 30, 9)]
    path = tmp_path / "model.onnx"
    sentiment.export(model, rows, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in ([rows[0]], rows):
        ids, mask = sentiment.pad_batch(batch)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert abs(got - model(ids, mask).detach().numpy()).max() < 1e-5

    def run(batch: list[list[int]]):
        ids, mask = sentiment.pad_batch(batch)
        return session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

    short_alone, short_padded = run([rows[2]]), run([rows[2], rows[3]])
    assert abs(short_alone[0] - short_padded[0]).max() < 1e-5  # 29 padding tokens change nothing


def test_composed_everyday_sentences_are_distinct_balanced_seeded_and_never_a_check_sentence() -> None:
    from training.everyday_sentences import generate

    check = ["This phone works great.", "Never again!"]
    texts, labels = generate(2000, seed=3, exclude=check)
    assert len(set(texts)) == 2000 and sum(labels) == 1000
    assert generate(2000, seed=3, exclude=check) == (texts, labels)
    keys = {" ".join(t.lower().strip(".!").split()) for t in texts}
    assert "this phone works great" not in keys and "never again" not in keys


def test_the_second_composer_writes_reviews_as_people_do_and_keeps_the_first_versions_draw() -> None:
    import hashlib

    from training.everyday_sentences import generate
    from training.sentiment import read_everyday

    # v2's 8,000 training sentences, drawn by the composer before its second version (bb218d5).
    check_set = read_everyday(Path(__file__).parent / "data" / "everyday_sentiment.tsv")[0]
    texts, labels = generate(8000, seed=1, exclude=check_set, talk=0.0)
    drawn = "\n".join(f"{t}\t{y}" for t, y in zip(texts, labels, strict=True))
    assert (
        hashlib.sha256(drawn.encode()).hexdigest() == "477f301c3c0560eca8e4d3149818a19745d4ca2df25d5b6121b4b13c1d3a7e87"
    )
    check = ["Never again.", "Save your money", "10/10"]
    texts, labels = generate(4000, seed=1, exclude=check, talk=1.0)
    assert len(set(texts)) == 4000 and sum(labels) == 2000
    keys = {" ".join(t.lower().strip(".!").split()) for t in texts}
    assert not keys & {"never again", "save your money", "10/10"}
    positive = [t for t, y in zip(texts, labels, strict=True) if y]
    negative = [t for t, y in zip(texts, labels, strict=True) if not y]
    # Scores, several sentences and negations occur on both sides, so none of them decides alone.
    for side in (positive, negative):
        assert sum("/10" in t or "star" in t.lower() for t in side) > 100
        assert sum(t.count(". ") >= 1 for t in side) > 100
        assert sum(any(n in t.lower() for n in ("n't", "not ", "never", "nothing")) for t in side) > 100


def test_the_third_composer_tells_what_happened_on_both_sides_of_the_same_words() -> None:
    from training.everyday_sentences import generate

    drawn = generate(3000, seed=1, talk=0.5)
    assert generate(3000, seed=1, talk=0.5, events=0.0) == drawn  # events 0 draws exactly v3's sentences
    texts, labels = generate(4000, seed=2, events=1.0)
    assert len(set(texts)) == 4000 and sum(labels) == 2000
    assert generate(4000, seed=2, events=1.0) == (texts, labels)
    positive = [t.lower() for t, y in zip(texts, labels, strict=True) if y]
    negative = [t.lower() for t, y in zip(texts, labels, strict=True) if not y]
    # A problem's name, a time, "still", "every", praise words and stars occur on both sides, so that
    # no word decides alone: what happened does.
    for words in (["leak", "pain", "crash"], ["minutes", "hours", "days"], ["still "], ["every "]):
        for side in (positive, negative):
            assert sum(any(w in t for w in words) for t in side) >= 20, (words, len(side))
    assert sum("stars" in t for t in positive) >= 3 and sum("stars" in t for t in negative) >= 3
    for praise in ("great", "wonderful", "brilliant", "love"):
        assert sum(praise in t for t in negative) >= 10 and sum(praise in t for t in positive) >= 10, praise


def test_rating_smoke_training_exports_a_servable_model(data_dir: Path, tmp_path: Path) -> None:
    from training import rating

    meta = rating.main(
        ["--smoke", "--data-dir", str(data_dir / "rating" / "ml-latest-small"), "--output-dir", str(tmp_path)]
    )
    metrics = meta["metrics"]
    assert metrics["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert metrics["test_rmse"] > 0 and metrics["baseline_test_rmse"] > 0 and metrics["validation_rmse"] > 0
    # Both heads are scored on the test split against the baselines, the epochs chosen on validation.
    ranking = metrics["ranking"]
    assert ranking["test_users"] > 0 and ranking["validation_users"] > 0 and ranking["epochs"] >= 1
    for name in ("ranking_score", "popularity", "rating_head", "rating_head_clipped", "cold_start_scores"):
        assert 0.0 <= ranking["test"][name]["ndcg"] <= ranking["test"][name]["hit_rate"] <= 1.0
    assert "test" in meta["dataset"]["split"] and "--smoke" in meta["training"]["command"]
    spec = json.loads((tmp_path / "rating" / "model.json").read_text())
    assert [o["name"] for o in spec["outputs"]] == ["rating", "score"]
    assets = json.loads((tmp_path / "rating" / "1" / "recommender.json").read_text())
    assert assets["popular_scores"] == sorted(assets["popular_scores"], reverse=True)
    user = assets["users"][0]
    with make_client(repository=tmp_path) as client:
        wait_ready(client)
        response = client.post("/v1/recommendations", json={"user_id": user, "k": 3})
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert len(items) == 3 and items == sorted(items, key=lambda i: (-i["score"], int(i["item_id"])))


def test_temporal_split_validation_is_carved_from_training_and_precedes_test(data_dir: Path) -> None:
    import numpy as np

    from training.rating import Config, load_split

    split = load_split(Config(data_dir=data_dir / "rating" / "ml-latest-small", smoke=True))
    assert len(split.fit.ratings) + len(split.val.ratings) == len(split.train.ratings)
    assert len(split.train.ratings) + len(split.test.ratings) == len(split.data.ratings)
    for user in np.unique(split.data.users):
        fit, val, test = (s.timestamps[s.users == user] for s in (split.fit, split.val, split.test))
        if len(val):
            assert fit.max() <= val.min()
        if len(test):
            assert max(fit.max(), val.max(initial=0)) <= test.min()


def test_temporal_split_holds_out_each_users_latest_ratings() -> None:
    import numpy as np

    from training.rating import Ratings, temporal_split

    data = Ratings(
        users=np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3]),
        items=np.arange(13),
        ratings=np.ones(13, np.float32),
        timestamps=np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 20, 10, 1]),
    )
    train, val = temporal_split(data, 0.2)
    # User 1: the two latest (timestamps 9 and 10); user 2: the later one; user 3 has one rating: kept for training.
    assert sorted(data.timestamps[val & (data.users == 1)].tolist()) == [9, 10]
    assert data.timestamps[val & (data.users == 2)].tolist() == [20]
    assert not val[data.users == 3].any()
    assert (train ^ val).all()


def test_translation_smoke_training_exports_two_graphs_that_serve(data_dir: Path, tmp_path: Path) -> None:
    from training import translation

    meta = translation.main(
        ["--smoke", "--data-dir", str(data_dir / "translation"), "--output-dir", str(tmp_path), "--seed", "3"]
    )
    version_dir = tmp_path / "translation-en-fr" / "1"
    for name in ("model.onnx", "encoder.onnx", "tokenizer.json", "metadata.json"):
        assert (version_dir / name).is_file(), name
    metrics = meta["metrics"]
    assert metrics["validation_sentences"] == 100 and 0.0 <= metrics["validation_bleu"] <= 100.0
    assert max(metrics["onnx_vs_torch_max_abs_diff"].values()) < 1e-3
    with make_client(repository=tmp_path, warmup=False) as client:
        wait_ready(client)
        response = client.post("/v1/translation", json={"texts": ["Hello.", "How are you?"], "max_new_tokens": 5})
        assert response.status_code == 200, response.text
        assert len(response.json()["translations"]) == 2


def test_translation_split_keeps_every_translation_of_a_sentence_on_one_side() -> None:
    from training.translation import split_by_english

    pairs = [(f"e{i % 50}", f"f{i}") for i in range(200)]  # 4 translations per English sentence
    train, held = split_by_english(pairs, 10, seed=5)
    assert len(held) == 10 and all(len(refs) == 4 for refs in held.values())
    assert not {en for en, _ in train} & set(held)
    assert len(train) == 160


def test_text_generation_smoke_training_exports_two_graphs_with_parity(data_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from training import text_generation

    meta = text_generation.main(
        ["--smoke", "--data-dir", str(data_dir / "translation"), "--output-dir", str(tmp_path), "--seed", "3"]
    )
    model_dir = tmp_path / "text-generator"
    version_dir = model_dir / "1"
    for name in ("model.onnx", "prefill.onnx", "tokenizer.json", "metadata.json"):
        assert (version_dir / name).is_file(), name
    assert json.loads((version_dir / "metadata.json").read_text()) == meta
    metrics = meta["metrics"]
    for split in ("validation", "test"):
        assert 0.0 < metrics[f"{split}_bits_per_character"] < 10.0 and metrics[f"{split}_perplexity"] > 1.0
    baseline = metrics["ngram_baseline"]
    assert set(baseline["bits_per_character"]) == {"5", "6", "7"} and baseline["chosen_order"] in (5, 6, 7)
    assert metrics["test_bits_per_character_ratio_to_ngram"] > 0.0
    assert max(metrics["onnx_vs_torch_max_abs_diff"].values()) < 1e-4
    assert "prefill_ragged_lengths_5_12_3_9" in metrics["onnx_vs_torch_max_abs_diff"]  # torch row by row
    assert "--smoke" in meta["training"]["command"]
    prefill = ort.InferenceSession(str(version_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in prefill.get_inputs()] == ["ids", "lengths", "positions"]

    spec = json.loads((model_dir / "model.json").read_text())
    assert spec["task"] == "text-generation" and spec["parameters"]["prefill"] == "prefill.onnx"
    vocab = spec["outputs"][0]["shape"][1]
    _, layers, hidden = spec["inputs"][1]["shape"]
    step = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    state = np.zeros((3, layers, hidden), dtype=np.float32)
    log_probs, h_next, c_next = step.run(None, {"token": np.array([1, 5, 9]), "h": state, "c": state})
    assert log_probs.shape == (3, vocab) and h_next.shape == c_next.shape == state.shape
    assert np.allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-4)


def test_the_language_model_trains_where_only_torch_and_the_packed_wheels_are(tmp_path: Path) -> None:
    # The GPU machine has torch, numpy, onnx, onnxruntime and tokenizers; gpu_text_generation.sh
    # brings pydantic and tqdm. The service's other dependencies are not there: an import of one (the
    # prefill graph's helpers came from the service's task module, which imports every task) failed
    # every run of the script before it trained.
    blocker = (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {BLOCKED}:\n"
        "            raise ModuleNotFoundError(f'{name} is not on the GPU machine')\n"
        "sys.meta_path.insert(0, Blocked())\n"
        "import training.text_generation, training.lm_ensemble\n"
    ).replace(
        "{BLOCKED}",
        repr(
            {
                "PIL",
                "pydantic_settings",
                "dotenv",
                "prometheus_client",
                "opentelemetry",
                "fastapi",
                "starlette",
                "uvicorn",
                "httptools",
                "uvloop",
                "orjson",
                "multipart",
                "anyio",
                "httpx",
            }
        ),
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_text_generation_trained_in_one_place_is_exported_in_another_with_the_same_weights(
    data_dir: Path, tmp_path: Path
) -> None:
    # The GPU machine trains (--checkpoint, fp16 weights on the way back), this machine exports and
    # scores (--from-checkpoint, the network and split taken from the checkpoint whatever the flags);
    # lm_ensemble scores checkpoints alone and mixed on the split they were trained on.
    import torch

    from training import lm_ensemble, text_generation

    data = ["--data-dir", str(data_dir / "translation")]
    out = tmp_path / "repository"
    trained = [
        *data,
        "--smoke",
        "--layers",
        "1",
        "--split-seed",
        "5",
        "--output-dir",
        str(out),
        "--time-budget-min",
        "5",
    ]
    for seed, name in ((3, "a"), (4, "b")):
        summary = text_generation.main([*trained, "--seed", str(seed), "--checkpoint", str(tmp_path / name)])
        assert summary["best_epoch"] == 1 and not out.exists()  # stopped before the export
    record = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    record["state"] = {k: v.half() for k, v in record["state"].items()}
    torch.save(record, tmp_path / "a" / "checkpoint.pt")
    # none of the training flags again: 2 layers and split seed 1 would be the defaults
    meta = text_generation.main([*data, "--from-checkpoint", str(tmp_path / "a"), "--output-dir", str(out)])
    config = meta["training"]["config"]
    assert (config["layers"], config["split_seed"], config["smoke"], config["seed"]) == ("1", "5", "True", "3")
    assert meta["training"]["command"].count("python -m training.text_generation") == 2
    assert "--checkpoint" in meta["training"]["command"] and meta["training"]["history"] == record["history"]
    assert max(meta["metrics"]["onnx_vs_torch_max_abs_diff"].values()) < 1e-4
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    scored = lm_ensemble.main([*data, "--output", str(tmp_path / "mix.json"), *folders])
    singles = {s["members"][0]: s for s in scored["subsets"] if len(s["members"]) == 1}
    assert len(scored["subsets"]) == 3
    # the exported graphs score what torch scored: the same weights, the same split
    assert abs(singles["a"]["test_bits_per_character"] - meta["metrics"]["test_bits_per_character"]) < 1e-3
    # members of different splits are not mixed
    text_generation.main(
        [*data, "--smoke", "--layers", "1", "--output-dir", str(out), "--checkpoint", str(tmp_path / "c")]
    )
    with pytest.raises(SystemExit, match="different splits"):
        lm_ensemble.main([*data, "--output", str(tmp_path / "mix.json"), *folders, str(tmp_path / "c")])


def test_character_ngram_distributions_sum_to_one_and_unseen_characters_have_mass() -> None:
    import numpy as np

    from training.text_generation import CharNgram

    sentences = ["Tom is here.", "Tom is happy.", "I think so.", "Is Tom here?", "I'm happy."] * 3
    model = CharNgram(sentences, max_order=5)
    alphabet = [*sorted({ch for s in sentences for ch in s}), "é"]  # é: never seen
    for context in ("", "Tom i", "I thi", "xyz"):
        for order in (1, 3, 5):
            p_next = model.probabilities([context + ch for ch in alphabet], order)
            after = np.cumsum([len(context) + 2] * len(alphabet)) - 2  # each text's last character
            p_end = model.probabilities([context], order)[-1]
            # the seen characters, the unknown symbol (é) and the end: the whole vocabulary
            assert p_next[after].sum() + p_end == pytest.approx(1.0, abs=1e-9)
            assert p_next[after][-1] > 0.0


@pytest.mark.parametrize("dataset", ["digits", "yolo", "faces"])
def test_detector_smoke_training_exports_a_graph_that_serves(data_dir: Path, tmp_path: Path, dataset: str) -> None:
    from training import object_detection

    argv = ["--smoke", "--dataset", dataset, "--output-dir", str(tmp_path), "--name", "detector"]
    argv += ["--data-dir", str(data_dir), "--yolo-dir", str(data_dir / "object_detection" / "coco128")]
    argv += ["--checkpoint-dir", str(tmp_path.parent / f"{tmp_path.name}-checkpoints")]  # not in the repository
    meta = object_detection.main(argv)
    assert 0.0 <= meta["metrics"]["map_50_95"] <= meta["metrics"]["map_50"] <= 1.0
    if dataset == "digits":  # paper scenes trained on and scored apart
        assert meta["metrics"]["paper"]["test_images"] == 8 and "paper scenes" in meta["dataset"]["train"]
        # --score scores an exported graph on the same held-out scenes and gives the same figures
        scored = object_detection.main([*argv, "--score", str(tmp_path / "detector" / "1" / "model.onnx")])
        assert scored["metrics"]["map_50"] == meta["metrics"]["map_50"]
        assert scored["metrics"]["paper"] == meta["metrics"]["paper"]
    spec = json.loads((tmp_path / "detector" / "model.json").read_text())
    assert len(spec["labels"]) == {"digits": 10, "yolo": 80, "faces": 1}[dataset]
    assert spec["default"] is (dataset != "faces")  # the face detector never takes over /v1/object-detection
    with make_client(repository=tmp_path, warmup=False) as client:
        wait_ready(client)
        size = spec["parameters"]["input_size"]
        body = {
            "inputs": [
                {"name": "images", "shape": [2, 3, size, size], "datatype": "FP32", "data": [0.5] * (6 * size * size)}
            ]
        }
        response = client.post("/v2/models/detector/infer", json=body)
        assert response.status_code == 200, response.text
        assert [o["shape"] for o in response.json()["outputs"]] == [[2, 100, 4], [2, 100], [2, 100]]


def test_paper_scenes_are_reproducible_and_each_box_holds_its_digit_s_ink(data_dir: Path) -> None:
    """Paper scenes: the same index gives the same pixels; boxes lie in the frame; each box holds ink
    (pixels much darker than the page around the digits) reaching near all four of its sides, so it
    is the ink's tight box; training and held-out scenes draw different digits."""
    import numpy as np

    from training.paper_scenes import makers

    scenes = makers(data_dir, 1)
    train, test = scenes["train"], scenes["test"]
    assert not np.array_equal(train.digits[:100], test.digits[:100])  # MNIST train vs test writers
    for i in range(12):
        image, boxes, classes = train.scene(i)
        again, boxes_again, _ = train.scene(i)
        assert np.array_equal(image, again) and np.array_equal(boxes, boxes_again)
        h, w = image.shape[:2]
        assert len(boxes) == len(classes) >= 1 and ((classes >= 0) & (classes <= 9)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        grey = image.astype(np.float32).mean(axis=2)
        for x1, y1, x2, y2 in boxes:
            inside = grey[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]
            pad = 6
            around = grey[max(0, int(y1) - pad) : int(y2) + pad, max(0, int(x1) - pad) : int(x2) + pad]
            dark = inside < np.percentile(around, 90) - 25  # ink: well below the page's brightness
            assert dark.sum() >= 3
            ys, xs = np.nonzero(dark)
            # Ink comes within a few pixels of every side (blur and JPEG soften the outermost pixel).
            slack = 4 + 0.15 * max(inside.shape)
            assert ys.min() <= slack and xs.min() <= slack
            assert inside.shape[0] - 1 - ys.max() <= slack and inside.shape[1] - 1 - xs.max() <= slack
    assert not np.array_equal(train.scene(0)[0][:50, :50], test.scene(0)[0][:50, :50])


def test_digits_of_a_written_number_sometimes_touch_as_handwriting_does(data_dir: Path) -> None:
    """Digits are spaced by the gaps between their ink (some slightly negative), not by their padded
    canvases: in held-out paper scenes some side-by-side digits' boxes meet or overlap, though never
    by much. Measured: 33 of 126 side-by-side digits in 30 scenes; v2's generator, which spaced them
    by their canvases (every gap at least 0.2 of a height), gives 0 of 46."""

    from training.paper_scenes import makers

    maker = makers(data_dir, 1)["test"]
    touching = neighbours = 0
    for i in range(30):
        _, boxes, _ = maker.scene(i)
        for a in boxes:
            for b in boxes:
                height = min(a[3] - a[1], b[3] - b[1])
                same_row = min(a[3], b[3]) - max(a[1], b[1]) > 0.5 * height
                if not (same_row and a[0] < b[0]) or b[0] - a[2] > 0.4 * height:
                    continue  # not b right after a in a row
                neighbours += 1
                touching += bool(b[0] <= a[2])
                assert a[2] - b[0] <= 0.35 * height  # overlap in x of at most the overlap allowed plus the turn
    print(f"{touching} of {neighbours} side-by-side digits touch")
    assert neighbours >= 40 and 0.05 <= touching / neighbours <= 0.6, (touching, neighbours)


def test_a_detector_loads_back_from_its_exported_graph(tmp_path: Path) -> None:
    """--init-from model.onnx: the exported graph (batch norms folded into the convolutions) loads
    back into a detector that computes what the graph does, with its norms frozen for fine-tuning."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from training import common
    from training.object_detection import Detector, ExportGraph, weights_from_onnx

    torch.manual_seed(0)
    trained = Detector(10, 8)
    for m in trained.modules():  # batch norms with statistics of their own, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    graph = ExportGraph(trained.eval(), 20).eval()
    images = torch.rand(2, 3, 64, 64)
    path = tmp_path / "model.onnx"
    outputs = ["boxes", "scores", "classes"]
    common.export_onnx(graph, (images,), path, input_names=["images"], output_names=outputs, dynamic_axes={})
    loaded = Detector(10, 8)
    weights_from_onnx(loaded, path)
    assert loaded.frozen_norms
    with torch.no_grad():
        heat, size, offset = loaded.eval()(images)
        want = trained(images)
    for a, b in zip((heat, size, offset), want, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    scores = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})[1]
    with torch.no_grad():
        assert np.abs(ExportGraph(loaded, 20)(images)[1].numpy() - scores).max() < 1e-5
    with pytest.raises(ValueError, match=r"stem.0.0 is \(4, 3, 3, 3\) there, \(8, 3, 3, 3\) here"):
        weights_from_onnx(Detector(10, 16), path)  # another width does not fit


def test_face_recognition_smoke_training_exports_a_graph_that_serves_verification(
    data_dir: Path, tmp_path: Path
) -> None:
    """A tiny run end to end: held-out folds' people are not trained on, the graph gives unit
    vectors (parity with torch at batch 8), the metadata has the protocol's figures beside the LBP
    baseline, and the service verifies two faces with it; --evaluate-only measures it again."""
    import base64
    import io

    from PIL import Image

    from training import face_recognition

    argv = ["--smoke", "--data-dir", str(data_dir / "face_recognition"), "--output-dir", str(tmp_path)]
    argv += ["--detector", ""]
    meta = face_recognition.main(argv)
    metrics = meta["metrics"]
    assert metrics["heldout_folds"] == [1, 2, 3] and metrics["onnx_vs_torch_max_abs_diff"] < 1e-4
    for figures in (metrics["verification"], metrics["baseline_lbp"]["verification"]):
        assert len(figures["fold_accuracies"]) == 3 and 0.0 <= figures["accuracy_mean"] <= 1.0
    assert meta["dataset"]["train_people"] > 0 and "--smoke" in meta["training"]["command"]
    spec = json.loads((tmp_path / "face-embedding" / "model.json").read_text())
    assert "detector" not in spec["parameters"]
    assert spec["parameters"]["threshold"] == metrics["verification"]["threshold"]
    again = face_recognition.main([*argv, "--evaluate-only"])
    assert again["training"] == meta["training"] and "--evaluate-only" in again["metrics_command"]

    def face(seed: int) -> str:
        pixels = np.random.default_rng(seed).integers(0, 255, (250, 250, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    with make_client(repository=tmp_path, warmup=False) as client:
        wait_ready(client)
        response = client.post("/v1/face-verification", json={"images": [face(1), face(1)]})
        assert response.status_code == 200, response.text
        assert response.json()["score"] == pytest.approx(1.0, abs=1e-5)  # one image twice: the same vector


def test_map_evaluator_scores_perfect_and_shifted_boxes() -> None:
    import numpy as np

    from training.object_detection import coco_map

    truth = [(np.array([[10, 10, 50, 60], [100, 100, 140, 150]], np.float32), np.array([3, 7]))]
    perfect = [(truth[0][0], np.array([0.9, 0.8]), truth[0][1])]
    assert coco_map(perfect, truth, 10) == pytest.approx({"map_50_95": 1.0, "map_50": 1.0})
    shifted = [(truth[0][0] + 8, np.array([0.9, 0.8]), truth[0][1])]  # IoU about 0.55 to 0.6
    scores = coco_map(shifted, truth, 10)
    assert scores["map_50"] == pytest.approx(1.0) and scores["map_50_95"] < 0.3
    wrong_class = [(truth[0][0], np.array([0.9, 0.8]), np.array([4, 7]))]
    assert coco_map(wrong_class, truth, 10)["map_50"] == pytest.approx(0.5)


def test_image_generation_smoke_trains_both_archs_and_compares_them(data_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from training import image_generation

    evaluator = Path(__file__).resolve().parent.parent / "models" / "mnist" / "1" / "model.onnx"
    common = ["--smoke", "--data-dir", str(data_dir / "image_classification" / "mnist"), "--evaluator", str(evaluator)]
    image_generation.main([*common, "--arch", "mlp", "--output-dir", str(tmp_path / "mlp")])
    baseline = tmp_path / "mlp" / "digit-generator" / "1" / "metadata.json"
    meta = image_generation.main(
        [*common, "--arch", "dcgan", "--output-dir", str(tmp_path), "--baseline", str(baseline), "--seed", "3"]
    )
    version_dir = tmp_path / "digit-generator" / "1"
    assert (version_dir / "model.onnx").is_file()
    assert json.loads((version_dir / "metadata.json").read_text()) == meta
    metrics = meta["metrics"]
    assert metrics["onnx_vs_torch_max_abs_diff"] < 1e-4
    assert metrics["generated_samples"] == 500 and set(metrics["readback_per_digit"]) == {str(d) for d in range(10)}
    assert (
        0.0 <= metrics["readback_accuracy"] <= 1.0 and 0.9 <= metrics["evaluator_accuracy_on_real_test_digits"] <= 1.0
    )
    assert metrics["fid_test"] > metrics["fid_reference_real_validation_vs_test"] >= 0.0
    assert metrics["diversity"]["ratio"] > 0.0 and metrics["diversity"]["real_test_mean_pairwise_l2"] > 0.0
    comparison = metrics["comparison"]
    assert comparison["alternative"]["arch"] == "mlp" and "readback_accuracy" in comparison["alternative"]["metrics"]
    assert isinstance(comparison["this_arch_measures_better"], bool) and comparison["chosen_because"]
    assert "test" in meta["dataset"]["split"] and "--smoke" in meta["training"]["command"]

    spec = json.loads((tmp_path / "digit-generator" / "model.json").read_text())
    assert spec["task"] == "image-generation" and spec["parameters"] == {"latent_dim": 100}
    assert [(i["name"], i["datatype"], i["shape"]) for i in spec["inputs"]] == [
        ("z", "FP32", [-1, 100]),
        ("digit", "INT64", [-1]),
    ]
    assert spec["inputs"][1]["value_range"] == [0, 9]
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    (image,) = session.run(None, {"z": z, "digit": np.array([0, 5, 9], dtype=np.int64)})
    assert image.shape == (3, 1, 28, 28) and image.min() >= 0.0 and image.max() <= 1.0


def test_digit_ood_smoke_training_exports_a_scorer_with_its_threshold(data_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from training import digit_ood
    from training.idx import load_mnist

    fonts = Path("/usr/share/fonts/truetype/dejavu")
    if not list(fonts.glob("DejaVu*.ttf")):
        pytest.skip("the DejaVu fonts (Debian: fonts-dejavu-core) are needed for the letters")
    meta = digit_ood.main(
        [
            "--smoke",
            "--data-dir",
            str(data_dir / "image_classification" / "mnist"),
            "--coco-dir",
            str(data_dir / "object_detection" / "coco128" / "images"),
            "--fonts-dir",
            str(fonts),
            "--output-dir",
            str(tmp_path),
        ]
    )
    version_dir = tmp_path / "mnist-ood" / "1"
    assert json.loads((version_dir / "metadata.json").read_text()) == meta
    metrics = meta["metrics"]
    assert metrics["onnx_vs_torch_max_abs_diff"] < 1e-2  # scores of digits are tens
    for key in ("auroc_digits_vs_non_digits", "auroc_test_digits_vs_non_digits", "test_digits_flagged"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= metrics["test_digit_photos_flagged"] <= 1.0 and 0.0 <= metrics["non_digits_flagged"] <= 1.0
    assert 0.0 <= metrics["test_digit_pages_flagged"] <= 1.0 and "photographed pages" in meta["dataset"]["split"]["fit"]
    assert set(metrics["non_digits_flagged_per_kind"]) == set(digit_ood.NON_DIGIT_KINDS)
    assert set(metrics["letters_flagged_per_letter"]) == set(digit_ood.LETTERS)
    assert not set(digit_ood.LETTERS) & set(digit_ood.DIGIT_LOOKALIKES)
    assert 0.0 <= metrics["reconstruction_error_only"]["auroc"] <= 1.0
    assert "validation" in meta["dataset"]["split"] and "--smoke" in meta["training"]["command"]

    spec = json.loads((tmp_path / "mnist-ood" / "model.json").read_text())
    threshold = spec["parameters"]["threshold"]
    assert spec["task"] == "image-ood" and threshold == metrics["threshold"]
    assert spec["parameters"]["preprocessing"] == "mnist" and spec["task"] == "image-ood"
    assert [o["name"] for o in spec["outputs"]] == ["score", "reconstruction"]
    # A blank page reaches the model as all zeros (the service's preprocessing): flagged even here.
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    images, _ = load_mnist(data_dir / "image_classification" / "mnist", "test")
    batch = np.concatenate([np.zeros((1, 1, 28, 28), np.float32), images[:2, None].astype(np.float32) / 255.0])
    score, reconstruction = session.run(None, {"image": batch})
    assert score.shape == (3,) and reconstruction.shape == (3, 1, 28, 28)
    assert score[0] > threshold and score[0] > score[1:].max()


def test_ood_auroc_counts_ties_half_and_orders_scores() -> None:
    import numpy as np

    from training.digit_ood import auroc

    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auroc(np.array([2.0, 0.0]), np.array([1.0])) == 0.5


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift() -> None:
    import numpy as np

    from training.image_generation import frechet_distance

    x = np.random.default_rng(0).standard_normal((2000, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-3)  # |mean shift|^2, same covariance


def test_language_models_of_different_shapes_mix_into_one_pair_of_graphs(tmp_path: Path) -> None:
    # Members 1 x 24 and 2 x 16 wide: the mixture's state is [rows, 3, 24], the narrower member's
    # layers padded; its graphs against the members' own mixed in numpy, at rows > 1, prompts of
    # different lengths, and extreme log-probabilities (where a naive log-sum-exp loses everything).
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from training import lm_mixture, text_generation

    rng = np.random.default_rng(0)
    held = [[1, *rng.integers(4, 40, size=14).tolist(), 2] for _ in range(6)]
    dirs = []
    for k, (layers, hidden) in enumerate(((1, 24), (2, 16))):
        torch.manual_seed(k)
        cfg = text_generation.Config(vocab_size=40, embed_dim=16, hidden=hidden, layers=layers, seed=k)
        model = text_generation.LanguageModel(40, cfg).eval()
        with torch.no_grad():
            model.bias[7] = (-1e4, -200.0)[k]  # token 7 next to impossible: exp() of either is 0 in float32
        dirs.append(tmp_path / f"m{k}")
        text_generation.export_graphs(model, cfg, held, dirs[-1])
    weights = np.array([0.3, 0.7])
    steps = [onnx.load(str(d / "model.onnx")) for d in dirs]
    prefills = [onnx.load(str(d / "prefill.onnx")) for d in dirs]
    shapes = [lm_mixture.state_shape(s) for s in steps]
    assert shapes == [(1, 24), (2, 16)]
    out = tmp_path / "mix"
    out.mkdir()
    onnx.save(
        lm_mixture.merge(steps, weights, ["token"], ("log_probs", "h_next", "c_next"), shapes), str(out / "model.onnx")
    )
    onnx.save(
        lm_mixture.merge(prefills, weights, ["ids", "lengths", "positions"], ("log_probs", "h", "c"), shapes),
        str(out / "prefill.onnx"),
    )
    parity = lm_mixture.check(out, dirs, weights, held)
    assert max(parity.values()) < 1e-4, parity
    step = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    state = np.zeros((4, 3, 24), np.float32)
    log_probs, h, c = step.run(None, {"token": np.array([1, 5, 9, 7]), "h": state, "c": state})
    assert h.shape == c.shape == (4, 3, 24) and not h[:, 1:, 16:].any()  # the narrower member's padding
    assert np.allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-5)
    # token 7 keeps the second member's share (about -200), not log(0)
    alone = ort.InferenceSession(str(dirs[1] / "model.onnx"), providers=["CPUExecutionProvider"])
    other = alone.run(None, {"token": np.array([1]), "h": state[:1, 1:, :16], "c": state[:1, 1:, :16]})[0]
    assert log_probs[0, 7] == pytest.approx(np.log(0.7) + other[0, 7], abs=1e-4)


def test_a_mixture_of_trained_members_is_served_and_scores_no_worse_than_its_best_member(
    data_dir: Path, tmp_path: Path
) -> None:
    from training import lm_mixture, text_generation

    data = ["--data-dir", str(data_dir / "translation")]
    out = tmp_path / "members"
    for seed, layers in ((3, "1"), (4, "2")):
        text_generation.main([*data, "--smoke", "--layers", layers, "--seed", str(seed), "--split-seed", "5",
                              "--output-dir", str(out / str(seed)), "--version", "1"])  # fmt: skip
    members = [str(out / s / "text-generator" / "1") for s in ("3", "4")]
    repository = tmp_path / "repository"
    meta = lm_mixture.main([*data, "--output-dir", str(repository), "--version", "2", *members])
    metrics = meta["metrics"]
    singles = [m["validation_bits_per_character"] for m in meta["training"]["mixture"]]
    # EM's weights maximise the validation likelihood over mixtures, the members alone among them
    assert metrics["validation_bits_per_character"] <= min(singles) + 1e-4
    assert metrics["validation_bits_per_character"] == pytest.approx(
        metrics["numpy_mixture_bits_per_character"]["validation"], abs=2e-4
    )
    assert sum(m["weight"] for m in meta["training"]["mixture"]) == pytest.approx(1.0, abs=1e-3)
    assert max(metrics["mixture_vs_members_max_abs_diff"].values()) < 1e-4
    spec = json.loads((repository / "text-generator" / "model.json").read_text())
    assert spec["inputs"][1]["shape"] == [-1, 3, 48]
    with make_client(repository=repository) as c:
        wait_ready(c)
        body = {
            "model": "text-generator",
            "prompt": ["Tom is", "Can you tell"],
            "max_tokens": 5,
            "temperature": 0.8,
            "seed": 3,
            "n": 2,
        }
        first = c.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        assert len(first.json()["choices"]) == 4
        assert c.post("/v1/completions", json=body).json()["choices"] == first.json()["choices"]
    # members of different splits are not mixed
    text_generation.main([*data, "--smoke", "--seed", "6", "--output-dir", str(out / "6"), "--version", "1"])
    with pytest.raises(SystemExit, match="different splits"):
        lm_mixture.main([*data, "--output-dir", str(repository), "--version", "3", *members,
                         str(out / "6" / "text-generator" / "1")])  # fmt: skip


def test_a_check_sentence_is_near_copied_when_its_words_overlap_a_training_sentence_by_half() -> None:
    from training.near_copies import near_copied

    training = ["works perfectly fine", "Great pizza, rude waiter."]
    checks = ["Works perfectly!", "The hotel room was dirty.", "great pizza"]
    assert near_copied(checks, training, 0.5) == [True, False, True]
    assert near_copied(checks, training, 0.9) == [False, False, False]
