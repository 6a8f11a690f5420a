"""Numbers fixed by the published Live Avatar model. Sources: ../shared/docs/liveavatar-spec.md
(sections named in the comments), which describes the official Alibaba-Quark/LiveAvatar code."""

VIDEO_FPS = 25                    # §3.8: the mp4 is written at 25 fps; audio features are bucketed at 25 fps
AUDIO_SAMPLE_RATE = 16_000        # §3.2: wav2vec2 input rate (librosa.load(sr=16000))
AUDIO_FEATURE_RATE = 30           # §2.5: wav2vec2's 50 Hz hidden states are resampled to 30 Hz
WAV2VEC_RATE = 50                 # §2.5: wav2vec2 hidden states per second

FRAMES_PER_CLIP = 48              # §3.4: --infer_frames 48, the setting the model was trained with
LATENTS_PER_CLIP = 12             # §3.4: 48 frames / 4 (VAE temporal stride)
LATENTS_PER_BLOCK = 3             # §2.8: num_frames_per_block = 3
FRAMES_PER_BLOCK = 12             # 3 latents × 4 frames
BLOCKS_PER_CLIP = LATENTS_PER_CLIP // LATENTS_PER_BLOCK
DROPPED_LEADING_FRAMES = 3        # §3.7 / §8.1: the first 3 frames of clip 0 are dropped → 48·N − 3 frames

MOTION_FRAMES = 73                # §2.1: motion_frames (pixel frames) of the pipeline config
MOTION_LATENTS = 19               # §2.1: 73 pixel frames → 19 latent frames
AUDIO_HISTORY_FRAMES = MOTION_FRAMES  # §2.5: each block's audio is left-padded with 73 copies of its first frame

VAE_SPATIAL_STRIDE = 8            # §3.4
VAE_TEMPORAL_STRIDE = 4           # §3.4
SIZE_DIVISOR = 64                 # §3.1: H and W are multiples of 64 (FramePack 4× bucket needs latent/8)

REFERENCE_ROPE_FRAME = 30         # §2.4: the reference (sink) frame sits at temporal position 30
SINK_OFFSET_RANGE = (4, 30)       # §2.4: official code draws random.randint(4, 30) per forward call
WARM_UP_LATENTS = 7                # spec §3.7: the TPP decoder primes its caches with motion_latents[:, :, :7]
