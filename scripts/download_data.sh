# TextVQA_GT_bbox from ModelScope; then: python scripts/convert2sft_format.py --data_path ./data/textvqa_bbox --save_path ./data
# usage: bash scripts/download_data.sh [LOCAL_DIR]
modelscope download --dataset Tina12345/textVQA_groundingtask_bbox  --local_dir "${1:-./data/textvqa_bbox}"
