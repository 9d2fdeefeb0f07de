"""Moshi's two streams as plain numbers, for code that runs before (or without) a Mimi or an LM: the
websocket client, the speech fixtures, training-data checks, reading input audio. Code holding a model reads
the model's own values instead (`mimi.sample_rate`, `mimi.frame_size`, `lm.text_padding_token_id`).
No imports: the light clients use it. tests/models/test_streams.py pins these to moshi 0.2.13's."""

SAMPLE_RATE = 24000  # Hz, Mimi's audio
FRAME_RATE = 12.5  # Hz, Mimi frames = LM steps
FRAME = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples = one 80 ms frame
TEXT_PADDING_IDS = (0, 3)  # text ids that are not text: end-of-padding (0) and padding (3); moshi's server skips both
