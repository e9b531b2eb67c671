"""TF Serving config messages that the `tensorflow-serving-api` wheel does not ship.

`BatchingParameters` (tensorflow_serving/servables/tensorflow/session_bundle_config.proto),
`SSLConfig` (tensorflow_serving/config/ssl_config.proto) and `MonitoringConfig`
(tensorflow_serving/config/monitoring_config.proto) are rebuilt here from
their published definitions (same package, names and field numbers), so the files
`tensorflow_model_server` reads parse with `google.protobuf.text_format` unchanged.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)

    batching = descriptor_pb2.FileDescriptorProto(
        name="kvlm/tensorflow_serving/session_bundle_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = batching.message_type.add(name="BatchingParameters")
    for number, name, type_name in (
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
    ):
        message.field.add(name=name, number=number, type=_F.TYPE_MESSAGE, type_name=type_name, label=_F.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=_F.TYPE_INT64, label=_F.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=_F.TYPE_BOOL, label=_F.LABEL_OPTIONAL)
    pool.Add(batching)

    ssl = descriptor_pb2.FileDescriptorProto(
        name="kvlm/tensorflow_serving/ssl_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    message = ssl.message_type.add(name="SSLConfig")
    for number, name in ((1, "server_key"), (2, "server_cert"), (3, "custom_ca")):
        message.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    message.field.add(name="client_verify", number=4, type=_F.TYPE_BOOL, label=_F.LABEL_OPTIONAL)
    pool.Add(ssl)

    monitoring = descriptor_pb2.FileDescriptorProto(
        name="kvlm/tensorflow_serving/monitoring_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    message = monitoring.message_type.add(name="PrometheusConfig")
    message.field.add(name="enable", number=1, type=_F.TYPE_BOOL, label=_F.LABEL_OPTIONAL)
    message.field.add(name="path", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    message = monitoring.message_type.add(name="MonitoringConfig")
    message.field.add(name="prometheus_config", number=1, type=_F.TYPE_MESSAGE,
                      type_name=".tensorflow.serving.PrometheusConfig", label=_F.LABEL_OPTIONAL)
    pool.Add(monitoring)
    return pool


_POOL = _build_pool()
BatchingParameters = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
SSLConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.SSLConfig"))
MonitoringConfig = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))
