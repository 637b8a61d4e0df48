"""The linear classifier y = softmax(Wx + b) on real images, trained by lmkiln's loop.

nn.Linear computes Wx + b; the softmax is inside CrossEntropyLoss, as in every PyTorch classifier.
Data: scikit-learn's bundled 8x8 handwritten digits (no download).
    pip install 'lmkiln[classic]'; python examples/softmax_digits.py
"""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn, optim

import lmkiln

X, y = load_digits(return_X_y=True)  # 1,797 images, 64 pixels each (0..16), labels 0..9
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
X_train, X_val, y_train, y_val = train_test_split(X_train, y_train, test_size=0.15, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train, X_val, X_test = scaler.transform(X_train), scaler.transform(X_val), scaler.transform(X_test)

torch.manual_seed(0)
model = nn.Linear(64, 10)  # logits Wx + b
optimizer = optim.SGD(model.parameters(), lr=0.01)

trainer = lmkiln.Trainer(model, (X_train, y_train), (X_val, y_val), loss=nn.CrossEntropyLoss(), optimizer=optimizer,
                         epochs=50, batch_size=16, run_dir="runs/softmax-digits")  # fmt: skip
result = trainer.fit(overwrite=True)
test = trainer.evaluate((X_test, y_test))
print(f"softmax(Wx+b): test accuracy {test['accuracy']:.4f} after {result.epochs} epochs in {result.seconds:.1f} s")  # fmt: skip
