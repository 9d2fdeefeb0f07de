"""TTT-aware finetuning of Moshi (`moshi-ttt train`).

config.py  TrainConfig (YAML)          data.py   moshi-finetune data → 17-stream codes, batch order
loss.py    text + audio CE              params.py trainable sets, LoRA, fp32 master weights
telemetry.py grad norms, drift          checkpointing.py resumable checkpoints, export for infer/serve
dist.py    torchrun process group       fsdp.py   FSDP2 sharding, sharded checkpoints
loop.py    the Trainer                  command.py the command line
"""
