"""Run `movierec.train.train` from the command line, for tests that need a separate process.

Used by tests/test_train.py to kill a run with SIGKILL mid-way and to launch DDP under torchrun:

    python tests/train_helper.py DATA OUT --max-steps 12 --save-steps 4 [--resume] [--lr 0.02]
    torchrun --nproc_per_node 2 tests/train_helper.py DATA OUT ...

`$MOVIEREC_STEP_DELAY` (seconds) slows each step down so a test can kill the run between checkpoints.
"""
import argparse
import json

from movierec.train import TrainConfig, train


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("data"); ap.add_argument("out")
    ap.add_argument("--base-model", default="tiny-llama")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--save-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--objective", default="rating")
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    cfg = TrainConfig(learning_rate=a.lr, max_steps=a.max_steps, save_steps=a.save_steps, batch_size=a.batch_size,
                      objective=a.objective, max_val_examples=a.val, save_total_limit=3, logging_steps=2,
                      progress_bar=False)
    res = train(a.data, a.out, base_model=a.base_model, config=cfg, resume=a.resume)
    print(json.dumps({k: res[k] for k in ("steps", "world_size", "examples_seen", "resumed_from")}))


if __name__ == "__main__":
    main()
