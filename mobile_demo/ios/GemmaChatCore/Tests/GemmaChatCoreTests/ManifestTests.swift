import Foundation
import XCTest
@testable import GemmaChatCore

final class ManifestTests: XCTestCase {
    private var vectors: [String: Any] = [:]
    private var valid: [[String: Any]] = []

    override func setUpWithError() throws {
        vectors = try Vectors.load("manifests.json")
        valid = try Vectors.cases(vectors, "valid")
    }

    private func manifest(_ json: [String: Any]) throws -> BundleManifest {
        try BundleManifest(data: JSONSerialization.data(withJSONObject: json))
    }

    /// valid[base] with `set` fields replaced and `remove` paths deleted (contract.refused_manifest).
    private func patched(_ c: [String: Any]) throws -> [String: Any] {
        let base = try XCTUnwrap(c["base"] as? Int)
        var m = valid[base]
        for (key, value) in try XCTUnwrap(c["set"] as? [String: Any]) { m[key] = value }
        for path in try XCTUnwrap(c["remove"] as? [String]) {
            m = Self.removing(path.split(separator: "/").map(String.init), from: m)
        }
        return m
    }

    private static func removing(_ keys: [String], from dict: [String: Any]) -> [String: Any] {
        var out = dict
        if keys.count == 1 {
            out.removeValue(forKey: keys[0])
        } else if let child = dict[keys[0]] as? [String: Any] {
            out[keys[0]] = removing(Array(keys.dropFirst()), from: child)
        }
        return out
    }

    func testReadsTheFormatThePythonSideWrites() throws {
        XCTAssertEqual(vectors["supported_format_version"] as? Int, BundleManifest.supportedFormat)
        XCTAssertEqual(try valid.map { try manifest($0).target }, ["onnx", "executorch", "coreml"])
        for json in valid {
            let m = try manifest(json)
            XCTAssertEqual(m.bosId, 2)
            XCTAssertEqual(m.stopIds, [1, 106])
            XCTAssertTrue(m.prefillChunks.contains(m.prefillChunk))
            XCTAssertNoThrow(try GemmaChat.checkTemplate(m.chatTemplate))
        }
    }

    func testRefusesEveryBrokenManifest() throws {
        for c in try Vectors.cases(vectors, "refused") {
            XCTAssertThrowsError(try manifest(patched(c)), "\(c["why"]!)") { error in
                XCTAssertTrue(error is BundleError, "\(c["why"]!): \(error)")
            }
        }
    }

    func testAFutureFormatIsRefusedByName() throws {
        let future = try XCTUnwrap(Vectors.cases(vectors, "refused").first { ($0["why"] as! String).hasPrefix("written by a newer") })
        XCTAssertThrowsError(try manifest(patched(future))) { error in
            XCTAssertEqual(error as? BundleError, BundleError("This bundle is format 2, newer than the 1 this app reads; update the app."))
        }
    }

    func testCoreMLBundleHasItsFunctionsAndTokenizer() throws {
        let coreml = try manifest(valid[2])
        XCTAssertNoThrow(try coreml.requireTarget("coreml"))
        let functions = try coreml.coreMLFunctions()
        XCTAssertEqual(functions.prefill, coreml.prefillChunk)
        XCTAssertEqual(functions.decode, 1)
        XCTAssertNoThrow(try coreml.requireHFTokenizer())
        let executorch = try manifest(valid[1])
        XCTAssertThrowsError(try executorch.requireTarget("coreml"))
        XCTAssertThrowsError(try executorch.coreMLFunctions())
        XCTAssertThrowsError(try executorch.requireHFTokenizer())
    }

    func testAnotherTemplateIsRefused() throws {
        XCTAssertThrowsError(try GemmaChat.checkTemplate(manifest(valid[0]).chatTemplate + " "))
    }
}
