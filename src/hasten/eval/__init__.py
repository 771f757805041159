"""Quality metrics for the digits models: classifier accuracy, FD-digits, PSNR and SSIM."""

from .metrics import class_accuracy, evaluate_pipeline, frechet_distance, psnr, sample_eval_set, ssim

__all__ = ["class_accuracy", "evaluate_pipeline", "frechet_distance", "psnr", "sample_eval_set", "ssim"]
