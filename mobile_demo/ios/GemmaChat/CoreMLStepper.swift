import CoreML
import GemmaChatCore

/// The bundle's `model.mlpackage` run by Core ML: the `prefill` function (T = C) and the `decode`
/// function (T = 1) of one multifunction package, sharing one `MLState` that holds the KV cache.
final class CoreMLStepper: LogitsStep {
    private let prefill: MLModel
    private let decode: MLModel
    private let prefillT: Int
    private var state: MLState

    init(compiledModel: URL, manifest: BundleManifest, computeUnits: MLComputeUnits = .cpuAndNeuralEngine) throws {
        let functions = try manifest.coreMLFunctions()
        let decodeModel = try CoreMLStepper.load(compiledModel, function: "decode", computeUnits: computeUnits)
        prefillT = functions.prefill
        prefill = try CoreMLStepper.load(compiledModel, function: "prefill", computeUnits: computeUnits)
        decode = decodeModel
        state = decodeModel.makeState() // one state, shared by both functions
    }

    private static func load(_ url: URL, function: String, computeUnits: MLComputeUnits) throws -> MLModel {
        let configuration = MLModelConfiguration()
        configuration.functionName = function
        configuration.computeUnits = computeUnits
        return try MLModel(contentsOf: url, configuration: configuration)
    }

    func step(tokens: [Int32], position: Int) throws -> [Float] {
        let model: MLModel
        switch tokens.count {
        case prefillT: model = prefill
        case 1: model = decode
        default: throw BundleError("The Core ML package takes \(prefillT) or 1 tokens per call, not \(tokens.count).")
        }
        let ids = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        for (i, token) in tokens.enumerated() {
            ids[[0, NSNumber(value: i)]] = NSNumber(value: token)
        }
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: Int32(position))
        let input = try MLDictionaryFeatureProvider(dictionary: [
            "tokens": MLFeatureValue(multiArray: ids),
            "input_pos": MLFeatureValue(multiArray: pos),
        ])
        let output = try model.prediction(from: input, using: state)
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw BundleError("The Core ML package returned no logits.")
        }
        return MLShapedArray<Float>(logits).scalars
    }

    func resetState() throws {
        state = decode.makeState()
    }
}
