// Force-included for bindgen only: the Rust-side types mlx-rs expects (as on macOS).
#pragma once
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef __fp16 float16_t;
typedef unsigned short bfloat16_t;
// mlx-c's half.h would declare them again from <arm_fp16.h>/<arm_bf16.h> for an aarch64 target
// (a conflicting bfloat16_t); skip it: the Rust side gets the same types on every target.
#define MLX_HALF_H
