from robustdeq import create_model
from robustdeq.export import export_onnx


def test_export_leaves_the_model_in_eval_mode(tmp_path):
    """The exporter restores the wrapper's training flag recursively; the model must stay in eval
    mode (BatchNorm in the stem would otherwise switch to batch statistics for later calls)."""
    model = create_model("deq-tiny").eval()
    export_onnx(model, tmp_path / "model.onnx")
    assert not any(m.training for m in model.modules())
