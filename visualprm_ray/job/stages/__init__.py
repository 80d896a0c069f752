"""The job's stages, one file each, in data-flow order: read -> prepare -> score -> aggregate -> write.

A flat input (one row per candidate) first goes through ``regroup``, a pass of its own that writes
group rows (:mod:`visualprm_ray.job.flat`); the scoring pass then reads those like any other.

Between stages a row is one *group* (a question, its images and all its candidates), so a group's
candidates never part ways before the write: ranks need the whole group, and the write commits a
group's rows together. Internal columns carry the ``_vp_`` prefix so they can never collide with
the user's passthrough columns.
"""

ID = "_vp_id"
QUESTION = "_vp_question"
IMAGE = "_vp_image"
RESPONSES = "_vp_responses"
STEPS = "_vp_steps"
CANDIDATE_INDEX = "_vp_candidate_index"
# Where a row sits in the input: the file's index in the read plan and the row's position in it.
FILE = "_vp_file"
ROW = "_vp_row"

# Written by the flat layout's regroup pass: the input row whose image the group takes (joined
# back after the shuffle), and why the group's candidate indices could not be used.
IMAGE_FILE = "_vp_image_file"
IMAGE_ROW = "_vp_image_row"
INDEX_ERROR = "_vp_index_error"

# Written by prepare, read by score.
PREFIX = "_vp_prefix"
SUFFIXES = "_vp_suffixes"
POSITIONS = "_vp_positions"
TILES = "_vp_tiles"
NUM_TILES = "_vp_num_tiles"
TILE_SIZE = "_vp_tile_size"
NUM_TOKENS = "_vp_num_tokens"
NUM_STEPS = "_vp_num_steps"
RESPONSE_TEXT = "_vp_response_text"
CANDIDATE_ERROR = "_vp_candidate_error"
CANDIDATE_ERROR_STAGE = "_vp_candidate_error_stage"
CANDIDATE_ERROR_KIND = "_vp_candidate_error_kind"
TRUNCATED = "_vp_truncated"

# Written by score.
STEP_SCORES = "_vp_step_scores"

# Columns that are too heavy to carry past the stage that consumes them.
PREPARED_ONLY = (PREFIX, SUFFIXES, POSITIONS, TILES, TILE_SIZE)

# A problem of the whole group (its images, its question), written to every candidate row.
GROUP_ERROR = "_vp_group_error"
GROUP_ERROR_STAGE = "_vp_group_error_stage"
GROUP_ERROR_KIND = "_vp_group_error_kind"

# Written by aggregate.
SCORE = "_vp_score"
SCORE_MIN = "_vp_score_min"
SCORE_LAST = "_vp_score_last"
RANK = "_vp_rank"
IS_BEST = "_vp_is_best"
