from setuptools import setup

setup(
    name="t2f",
    version="0.1.0",
    description="Fast text-to-face: CLIP text encoder -> mapper -> StyleGAN2, trained without captions",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # One `t2f` namespace: the core package plus the top-level folders cli/, engine/, export/ and trainer/ under it.
    packages=["t2f", "t2f.cli", "t2f.engine", "t2f.engine.backends", "t2f.engine.serve", "t2f.export", "t2f.trainer"],
    package_dir={"t2f": "t2f", "t2f.cli": "cli", "t2f.engine": "engine", "t2f.engine.backends": "engine/backends",
                 "t2f.engine.serve": "engine/serve", "t2f.export": "export", "t2f.trainer": "trainer"},
    package_data={"t2f": ["clip_configs/*.json"], "t2f.engine.serve": ["static/*.html"]},
    install_requires=[
        "torch>=2.10,<2.15",  # weights_only loading: 2.10 fixes the last known bypass
        "torchvision>=0.25,<0.30",
        "open_clip_torch>=3.0,<4",
        "numpy>=1.24",
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=10",
        "matplotlib>=3.8,<4",  # t2f-train report: plots of a training run
        "huggingface_hub>=1.0,<3",  # hf-hub: mappers (snapshot_download into the Hugging Face cache); tested with 2.4
        "pyyaml>=5.1",  # the model card's YAML metadata (t2f-train)
    ],
    extras_require={
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxslim>=0.1.50"],   # or onnxruntime-gpu; TensorRT >= 10 from NVIDIA's index
        # t2f-serve: the tritonserver and Python backend bundled in nvidia-pytriton (which pins numpy<2), its clients, the front and the page.
        "serve": ["nvidia-pytriton>=0.7,<0.8", "tritonclient[http,grpc]>=2.50,<3", "starlette>=0.40,<2", "uvicorn[standard]>=0.30,<1",
                  "websockets>=12,<18"],
        "openvino": ["openvino>=2025.1", "onnx>=1.16", "onnxruntime>=1.18", "onnxslim>=0.1.50"],    # the openvino backend (CPU, fp32 and bf16)
        "test": ["pytest>=8", "onnx>=1.16", "onnxruntime>=1.18", "openvino>=2025.1", "onnxslim>=0.1.50", "playwright>=1.45,<2"],
    },
    entry_points={
        "console_scripts": [
            "t2f-infer=t2f.engine.cli:main",
            "t2f-convert=t2f.export.convert:main",
            "t2f-train=t2f.trainer.cli:main",
            "t2f-export=t2f.export.cli:main",
            "t2f-bench=t2f.engine.bench:main",
            "t2f-serve=t2f.engine.serve:main",
        ],
    },
)
