"""PyTorch as its tutorials train: the bench's own networks (bench/frameworks/pytorch.py), an
optimiser, a loss, and a for loop; channels-last on the CPU, as the bench runs them."""
import torch
from torch import nn

from common import main

from bench.frameworks.pytorch import CnnCifar10Net, DenseNet121, GruImdbNet, Resnet50


def _images(batches):
    return [(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)) for x, y in batches]


def _training(model, optimizer, criterion, prepare):
    def run(batches):
        model.train()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
        return loss.item()
    return prepare, run


def cnn_cifar10(spec, input_shape, batch_size):
    model = CnnCifar10Net(spec).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)
    prepare = lambda batches: [(x, y.long()) for x, y in _images(batches)]
    return "NHWC", _training(model, optimizer, nn.CrossEntropyLoss(), prepare)


def resnet50_inference(spec, input_shape, batch_size):
    model = Resnet50(spec).to(memory_format=torch.channels_last).eval()

    def run(batches):
        with torch.inference_mode():
            return [model(x).numpy() for x, _ in batches]
    return "NHWC", (_images, run)


def gru_imdb(spec, input_shape, batch_size):
    model = GruImdbNet(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    prepare = lambda batches: [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in batches]
    return "NTC", _training(model, optimizer, nn.CrossEntropyLoss(), prepare)


def densenet121_xray(spec, input_shape, batch_size):
    model = DenseNet121(spec).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    return "NHWC", _training(model, optimizer, nn.BCEWithLogitsLoss(), _images)


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, torch.manual_seed)
