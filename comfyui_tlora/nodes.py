"""The two T-LoRA nodes. Their class types are their names: "Load T-LoRA" and "T-LoRA schedule"."""
import folder_paths

from tlora.comfyui import load_tlora, schedule_image, schedule_rows, schedule_text
from tlora.settings import MAX_RANK


class LoadTLoRA:
    """MODEL in, MODEL out: a clone of the model whose every denoiser call runs the T-LoRA masked to r(t)."""

    DESCRIPTION = ("Applies a T-LoRA (tlora, SimpleTuner/LyCORIS 'tlora' or official T-LoRA file) with its "
                   "timestep mask at every sampling step. The schedule comes from the file.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "a file in models/loras"}),
                "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "mask": ("BOOLEAN", {"default": True, "tooltip": "off: every rank at every step (for comparison)"}),
            },
            "optional": {
                "min_rank": ("INT", {"default": 0, "min": 0, "max": MAX_RANK, "tooltip":
                                     "only for a file that does not carry its schedule; 0 = from the file"}),
                "exponent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip":
                                       "schedule exponent α, only for a file without a schedule; 0 = from the file"}),
            },
        }

    def load(self, model, lora_name, strength, mask, min_rank=0, exponent=0.0):
        if strength == 0:
            return (model,)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        return (load_tlora(model, path, strength, mask, min_rank or None, exponent or None),)


class TLoRASchedule:
    """The active rank of every T-LoRA on a model at each step of a sampler's sigmas."""

    DESCRIPTION = "Plots and tabulates the active T-LoRA rank at each sampling step for these sigmas."
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "table")
    FUNCTION = "preview"
    CATEGORY = "sampling/custom_sampling/sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sigmas": ("SIGMAS",)}}

    def preview(self, model, sigmas):
        rows = schedule_rows(model, sigmas)
        return (schedule_image(rows), schedule_text(rows))


NODE_CLASS_MAPPINGS = {"Load T-LoRA": LoadTLoRA, "T-LoRA schedule": TLoRASchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"Load T-LoRA": "Load T-LoRA", "T-LoRA schedule": "T-LoRA schedule"}
