"""torchtune's private HF weight map, built from the safetensors headers (gdt_tune.training.hf_weights):
equal to what ``load_checkpoint`` builds, and saving works with it. Fails if torchtune changes."""


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
