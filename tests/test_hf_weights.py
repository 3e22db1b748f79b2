"""torchtune's private HF weight map, built from the safetensors headers (gdt_tune.training.hf_weights):
equal to what ``load_checkpoint`` builds, and saving works with it. Fails if torchtune changes."""


import torch


def test_hf_weight_map_equals_what_torchtune_builds(demo_dir, tmp_path):
    """If torchtune changes how FullModelHFCheckpointer maps weights to files, this fails."""
    from torchtune.training import FullModelHFCheckpointer

    from gdt_tune.training.hf_weights import prepare_for_save

    def checkpointer():
        return FullModelHFCheckpointer(checkpoint_dir=str(demo_dir / "model"), checkpoint_files=["model.safetensors"],
                                       model_type="LLAMA3", output_dir=str(tmp_path))
    loaded = checkpointer()
    state = loaded.load_checkpoint()
    ours = checkpointer()
    prepare_for_save(ours)
    assert ours._weight_map == loaded._weight_map and len(ours._weight_map) > 10
    ours.save_checkpoint(state, epoch=0)
    assert (tmp_path / "epoch_0" / "model-00001-of-00001.safetensors").is_file()


def _load_both_ways(demo_dir, out, rank):
    """On each of 2 ranks: the tiny model sharded with FSDP2, loaded (a) from the full weights read by
    every rank, (b) from rank 0's read while rank 1 passes placeholders; returns whether the local
    shards are equal bit for bit, how many, and the bytes this rank read in (b)."""
    from functools import partial

    from torchtune import training
    from torchtune.models.llama3 import llama3
    from torchtune.training import FullModelHFCheckpointer

    from gdt_tune.cli.demo_assets import TINY_MODEL
    from gdt_tune.training.hf_weights import tune_shapes, weights_for_rank

    def checkpointer():
        return FullModelHFCheckpointer(checkpoint_dir=str(demo_dir / "model"), checkpoint_files=["model.safetensors"],
                                       model_type="LLAMA3", output_dir=str(out / f"rank{rank}"))

    shards, read = [], None
    for every_rank_reads in (True, False):
        with torch.device("meta"):
            model = llama3(**TINY_MODEL)
        training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=["output"])],
                             cpu_offload=False)
        model.to_empty(device="cpu")
        ckpt = checkpointer()
        if every_rank_reads:
            state = ckpt.load_checkpoint()["model"]
        else:
            state, read = weights_for_rank(ckpt, rank, tune_shapes(ckpt), torch.float32, torch.device("cpu"))
        training.load_from_full_model_state_dict(model, state, torch.device("cpu"), strict=True)
        shards.append({k: v.to_local().clone() for k, v in model.state_dict().items()})
    every, placeholders = shards  # compared here: tensors do not travel back through the result queue
    same = every.keys() == placeholders.keys() and all(torch.equal(every[k], placeholders[k]) for k in every)
    return same, len(every), read


def test_a_fresh_start_reads_the_weights_on_rank_0_only_and_loads_the_same_shards(demo_dir, tmp_path):
    from functools import partial

    from two_ranks import run_two_ranks

    results = run_two_ranks(partial(_load_both_ways, demo_dir, tmp_path), timeout=120)
    size = (demo_dir / "model" / "model.safetensors").stat().st_size
    assert results[1][2] == 0 and 0.9 * size < results[0][2] <= size  # rank 1 read nothing
    assert results[0][:2] == results[1][:2] == (True, 21)  # all 21 local shards (2 layers), bit for bit
