"""byo_app: the ServerApp, DiscoStrategy on your model."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from disco_fl.fl import DiscoStrategy, ModelSpec, run_disco

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    spec = ModelSpec(name=str(cfg["model"]), num_nodes=int(cfg["nodes"]))
    strategy = DiscoStrategy(
        spec,
        budget=float(cfg["budget"]),
        steps=int(cfg["steps"]),
        checkpoint_dir=str(cfg["run-dir"]) or None,
    )
    run_disco(
        grid,
        strategy,
        num_rounds=int(cfg["num-rounds"]),
        initial_checkpoint=str(cfg["initial-checkpoint"]),
    )
