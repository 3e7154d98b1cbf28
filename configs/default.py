"""Paper defaults (LayerShuffle, Sec. 4); other configs start from these.

Where the paper is silent, the Hugging Face Trainer defaults the authors ran with:
linear decay to zero, no warm-up, no weight decay, gradient clipping at norm 1.0,
mixed precision (their fp16 AMP; bf16 here, which needs no loss scaling).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  # baseline | layershuffle | position | predict | layerdrop
  c.variant = "layershuffle"
  c.layerdrop = 0.2                 # LayerDrop's skip probability (Fan et al. recommend 0.2)
  c.pos_table = "shared"            # position: one F=32 table for all layers (authors' code) | per_layer (paper text)
  c.predict_loss_reduction = "mean"  # predict: mean over layers (authors' code) | sum (paper's formula)
  c.predict_loss_weight = 1.0
  c.keep_layers = 0                 # >0: refine a reduced-depth model of the first k pretrained layers
  c.keep_method = "first"           # first | even (evenly spaced)
  # Stage 1, a sequential "pretraining" into <workdir>/pretrain, when >0 and init_from is "".
  c.pretrain_epochs = 0
  c.pretrain_lr = 1e-3
  c.refine_from_pretrain = True     # stage 2 starts from stage 1 (else from scratch)

  c.model = ml_collections.ConfigDict(dict(
      name="B/16", width=0, depth=0, mlp_dim=0, num_heads=0, patch_size=0,  # 0: from name
      num_classes=0, image_size=224, channels=3, distilled=False,
      dropout=0.0, attn_dropout=0.0, ln_eps=1e-12, impl="fetch", attention="xla", remat=False,
      # the authors' code: shared position table zeros, position head with transformers' init
      pos_table_init="zeros", predict_head_init="normal",
      deit_head="mean"))  # distilled: mean of both heads | cls: class-token head alone
  c.init_from = "hf:google/vit-base-patch16-224"  # hf:/timm:/npz: source, a converted dir or a workdir
  c.compute_dtype = "bfloat16"

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir="", train_split="train", eval_split="validation",
      preprocess="vit_center", augment=False, crop_scale=(0.08, 1.0), flip=True, prepare=False,
      num_threads=16, dir=""))

  c.batch_size = 128                # the paper's alternative: 640
  c.eval_batch_size = 256
  c.num_epochs = 20
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, schedule="linear", warmup_steps=0,
      grad_clip_norm=1.0))

  c.checkpoint_every_epochs = 1
  c.checkpoint_every_steps = 0      # >0: also save the latest state mid-epoch
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.eval_orders = 5                 # arbitrary-order evaluation: passes over val, a fresh order per batch
  c.eval_seed = 1234                # the orders of the arbitrary-order evaluations
  # The checkpoint kept as best has the lowest validation loss in this layer order: auto
  # (arbitrary for shuffled variants, as the authors' Trainer) | sequential | arbitrary.
  c.best_by = "auto"
  c.progress = True
  c.distributed = False             # multi-host: jax.distributed.initialize() on every host
  c.coordinator_address = ""        # host:port of process 0 (auto-detected on SLURM/MPI)
  c.num_processes = 0               # 0: auto-detect
  c.process_id = -1                 # -1: auto-detect
  return c
