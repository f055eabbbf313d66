########################################################
# train sft.py with 8gpu in deepspeed zero3 bf16
# (parameters, gradients and optimizer state sharded: for models that do not fit with zero2)
########################################################
accelerate launch \
    --num_processes 8 \
    --main_process_port 25001 \
    --config_file configs/deepspeed_bf16_zero3.yaml \
    sft.py \
    --config $1
