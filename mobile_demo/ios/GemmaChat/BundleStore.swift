import CoreML
import Foundation
import GemmaChatCore

/// Bundles live in the app's Documents folder (copied there with Finder, see mobile_demo/README.md):
/// each subfolder holding a manifest.json is one. Compiled models are cached in Application Support.
enum BundleStore {
    static var documents: URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
    }

    static func bundles() -> [URL] {
        let items = (try? FileManager.default.contentsOfDirectory(at: documents, includingPropertiesForKeys: nil)) ?? []
        return items.filter { FileManager.default.fileExists(atPath: $0.appendingPathComponent("manifest.json").path) }
            .sorted { $0.lastPathComponent < $1.lastPathComponent }
    }

    /// The manifest, checked for this app: a Core ML bundle with Gemma 3's template and a tokenizer.json.
    static func manifest(of bundle: URL) throws -> BundleManifest {
        let data: Data
        do {
            data = try Data(contentsOf: bundle.appendingPathComponent("manifest.json"))
        } catch {
            throw BundleError("\(bundle.lastPathComponent) has no readable manifest.json.")
        }
        let manifest = try BundleManifest(data: data)
        try manifest.requireTarget("coreml")
        _ = try manifest.coreMLFunctions()
        try manifest.requireHFTokenizer()
        try GemmaChat.checkTemplate(manifest.chatTemplate)
        return manifest
    }

    /// The compiled (.mlmodelc) form of the bundle's package, compiled once and kept.
    static func compiledModel(of bundle: URL, manifest: BundleManifest) async throws -> URL {
        let package = bundle.appendingPathComponent(manifest.artifact)
        guard FileManager.default.fileExists(atPath: package.path) else {
            throw BundleError("The bundle is incomplete: \(manifest.artifact) is missing.")
        }
        let support = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                                  appropriateFor: nil, create: true)
        let cached = support.appendingPathComponent("compiled").appendingPathComponent(bundle.lastPathComponent + ".mlmodelc")
        if FileManager.default.fileExists(atPath: cached.path),
           let built = try? cached.resourceValues(forKeys: [.contentModificationDateKey]).contentModificationDate,
           let source = try? package.resourceValues(forKeys: [.contentModificationDateKey]).contentModificationDate,
           built >= source {
            return cached
        }
        let compiled = try await MLModel.compileModel(at: package)
        try FileManager.default.createDirectory(at: cached.deletingLastPathComponent(), withIntermediateDirectories: true)
        if FileManager.default.fileExists(atPath: cached.path) { try FileManager.default.removeItem(at: cached) }
        try FileManager.default.moveItem(at: compiled, to: cached)
        return cached
    }
}
