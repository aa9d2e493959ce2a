// Force-included for bindgen only: the Rust-side types mlx-rs expects (as on macOS).
#pragma once
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef __fp16 float16_t;
typedef unsigned short bfloat16_t;
